"""The operator keeps views of the Jobs, pods and FineTuneJobs it watches (`views`): the status
derived from views equals the status derived from the whole objects as a real API server
serves them (managedFields, pod template, volumes, env), and the views are a fraction of the
size."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from finetune_operator.api import FineTuneJobStatus
from finetune_operator.builders import build_job, build_pod_spec
from finetune_operator.kube import progress_url
from finetune_operator.policy import Policy
from finetune_operator.status import derive_status, running_pod
from finetune_operator.views import finetunejob_view, job_view, pod_view
from test_status import CASES, GROUP_SPEC, SPEC, T1, indexed

Obj = dict[str, Any]
UID = "0b5a6f0e-6d1e-4c0a-9d55-3f1c1f3f9a10"


def managed_fields(obj: Obj, manager: str) -> list[Obj]:
    """managedFields as a real API server writes them: the tree of the fields a manager set."""

    def tree(value: Any) -> Any:
        if isinstance(value, dict):
            return {f"f:{k}": tree(v) for k, v in value.items()}
        return {}

    fields = {k: obj[k] for k in ("metadata", "spec", "status") if k in obj}
    return [
        {
            "manager": manager,
            "operation": "Update",
            "apiVersion": "v1",
            "time": "2026-01-01T12:00:00Z",
            "fieldsType": "FieldsV1",
            "fieldsV1": tree(fields),
        }
    ]


def served_job(job: Obj | None) -> Obj | None:
    """A Job as the API server serves it: the operator's manifest, its status, metadata."""
    if job is None:
        return None
    full = build_job("ft", "default", SPEC, Policy())
    full["metadata"].update(
        uid=UID,
        creationTimestamp="2026-01-01T12:00:00Z",
        ownerReferences=[{"kind": "FineTuneJob", "name": "ft", "uid": "owner"}],
    )
    full["spec"].update(job["spec"])
    full["status"] = copy.deepcopy(job["status"])
    full["metadata"]["managedFields"] = managed_fields(full, "kube-controller-manager")
    return full


def served_pod(pod: Obj) -> Obj:
    """A pod as the API server serves it: the Job's pod spec, with the test case's status."""
    full: Obj = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            **copy.deepcopy(pod["metadata"]),
            "uid": UID,
            "labels": {"finetune.dev/job": "ft", "batch.kubernetes.io/controller-uid": UID},
        },
        "spec": build_pod_spec("ft", "default", SPEC, Policy()),
        "status": copy.deepcopy(pod["status"]),
    }
    full["spec"]["containers"][0]["image"] = pod["spec"]["containers"][0]["image"]
    full["metadata"].setdefault("annotations", {})["kubectl.kubernetes.io/default-container"] = (
        "trainer"
    )
    full["metadata"]["managedFields"] = managed_fields(full, "kubelet")
    return full


def size(obj: Any) -> int:
    return len(json.dumps(obj))


@pytest.mark.parametrize(("job", "pods", "progress", "summ"), [c[1:5] for c in CASES])
def test_status_from_views_equals_status_from_whole_objects(
    job: Obj | None, pods: list[Obj], progress: Any, summ: Any
) -> None:
    full_job, full_pods = served_job(job), [served_pod(p) for p in pods]
    view_job = job_view(full_job) if full_job is not None else None
    view_pods = [pod_view(p) for p in full_pods]
    whole = derive_status(SPEC, full_job, full_pods, progress, summ, FineTuneJobStatus(), T1, 1)
    viewed = derive_status(SPEC, view_job, view_pods, progress, summ, FineTuneJobStatus(), T1, 1)
    assert viewed == whole
    assert [progress_url(p) for p in view_pods] == [progress_url(p) for p in full_pods]


def test_a_groups_pods_keep_their_index() -> None:
    zero, one = served_pod(indexed(0)), served_pod(indexed(1, created="2026-01-01T12:00:05Z"))
    views = [pod_view(zero), pod_view(one)]
    assert running_pod(views) is views[0]
    assert progress_url(views[0]) == "http://10.0.0.5:8080/progress"
    whole = derive_status(GROUP_SPEC, None, [zero, one], None, None, FineTuneJobStatus(), T1)
    assert derive_status(GROUP_SPEC, None, views, None, None, FineTuneJobStatus(), T1) == whole


def test_views_are_a_fraction_of_what_the_server_sends() -> None:
    job = served_job({"spec": {"suspend": False}, "status": {"active": 1}})
    pod = served_pod(indexed(0))
    assert job is not None
    assert size(job_view(job)) * 5 < size(job)
    assert size(pod_view(pod)) * 4 < size(pod)
    assert "managedFields" not in json.dumps([job_view(job), pod_view(pod)])


def test_a_finetunejob_view_keeps_what_kopf_and_the_task_read() -> None:
    body = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {
            "name": "ft",
            "namespace": "team-a",
            "uid": UID,
            "generation": 3,
            "resourceVersion": "42",
            "labels": {"team": "a"},
            "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": json.dumps({"spec": {}})
            },
            "managedFields": [{"manager": "kubectl"}],
        },
        "spec": {"model": {"source": "hf://x/y"}},
        "status": {"phase": "Running"},
    }
    assert finetunejob_view(body) == {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {
            "name": "ft",
            "namespace": "team-a",
            "uid": UID,
            "generation": 3,
            "resourceVersion": "42",
            "labels": {"team": "a"},
        },
        "spec": {"model": {"source": "hf://x/y"}},
        "status": {"phase": "Running"},
    }
