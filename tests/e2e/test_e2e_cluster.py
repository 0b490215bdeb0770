"""End to end on a real cluster (opt-in: `--e2e`, KUBECONFIG): CRD, operator, Job controller, GC.

The trainer pod is never required to run: examples/quickstart.yaml writes to the PVC
`finetune-outputs`, which the test namespace does not have, so its pod is created (and
admitted under the restricted Pod Security Standard) but stays Pending, unschedulable. No GPU,
no trainer image pull and no storage class are needed; the suite checks what the operator and
the API server do, not training (tests/integration and tests/gpu cover that).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from e2e_kube import (
    Cluster,
    Obj,
    Operator,
    api_error_text,
    condition,
    quickstart_body,
    run_cli,
    wait_for,
)
from finetune_operator.api import API_VERSION, KIND
from finetune_operator.builders import CONFIG_HASH_ANNOTATION, CONFIG_KEY, CONTAINER_NAME, JOB_LABEL
from finetune_operator.names import configmap_name, job_label, job_name, service_name
from finetune_trainer.progress import TERMINATION_MESSAGE_PATH
from kubernetes_asyncio.client.exceptions import ApiException

pytestmark = pytest.mark.e2e

PHASES = {"Pending", "ValidatingData", "Running", "Succeeded", "Failed", "Suspended"}
CHILD_TIMEOUT = 60.0
GC_TIMEOUT = 60.0


def status_of(cluster: Cluster, namespace: str, name: str) -> Obj:
    return dict((cluster.ftj(namespace, name) or {}).get("status") or {})


def controller_ref(obj: Obj) -> Obj:
    refs = [r for r in obj["metadata"].get("ownerReferences") or [] if r.get("controller")]
    assert len(refs) == 1, f"{obj.get('kind')} {obj['metadata']['name']}: owner references {refs}"
    ref: Obj = refs[0]
    return ref


def container(job: Obj) -> Obj:
    found = [
        c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == CONTAINER_NAME
    ]
    assert len(found) == 1, job["spec"]["template"]["spec"]["containers"]
    trainer: Obj = found[0]
    return trainer


# --------------------------------------------------------------------------------------------
# a valid FineTuneJob: children, owner references, status
# --------------------------------------------------------------------------------------------
def test_quickstart_gets_an_owned_configmap_and_job(
    cluster: Cluster, namespace: str, quickstart: Obj
) -> None:
    """ConfigMap + Job with deterministic names, owned by the FineTuneJob (controller=true),
    a locked-down pod template, and a status with a phase and a Created condition."""
    name = quickstart["metadata"]["name"]
    ftj = cluster.ftj(namespace, name)
    assert ftj is not None
    uid = ftj["metadata"]["uid"]

    job = cluster.job(namespace, job_name(name))
    configmap = wait_for(
        lambda: cluster.configmap(namespace, configmap_name(name)),
        f"ConfigMap {configmap_name(name)}",
        timeout=CHILD_TIMEOUT,
    )
    assert job is not None
    for child in (configmap, job):
        ref = controller_ref(child)
        assert ref["uid"] == uid
        assert (ref["apiVersion"], ref["kind"], ref["name"]) == (API_VERSION, KIND, name)
        assert child["metadata"]["labels"][JOB_LABEL] == job_label(name)

    config = json.loads(configmap["data"][CONFIG_KEY])
    assert config["model"]["source"] == quickstart["spec"]["model"]["source"]
    assert (
        job["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
        == configmap["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
    )

    template = job["spec"]["template"]
    pod = template["spec"]
    assert template["metadata"]["labels"][JOB_LABEL] == job_label(name)
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    trainer = container(job)
    assert trainer["securityContext"]["runAsNonRoot"] is True
    assert trainer["securityContext"]["allowPrivilegeEscalation"] is False
    assert trainer["terminationMessagePath"] == TERMINATION_MESSAGE_PATH
    assert {"name": "config", "configMap": configmap_name(name)} in [
        {"name": v["name"], "configMap": (v.get("configMap") or {}).get("name")}
        for v in pod["volumes"]
    ]
    assert job["spec"].get("suspend") is not True

    def reported() -> Obj | None:
        status = status_of(cluster, namespace, name)
        created = condition({"status": status}, "Created")
        if status.get("phase") in PHASES and created and created.get("status") == "True":
            return status
        return None

    status = wait_for(
        reported,
        "a phase and Created=True in the status",
        timeout=CHILD_TIMEOUT,
        detail=lambda: status_of(cluster, namespace, name),
    )
    assert status["jobName"] == job_name(name)
    created = condition({"status": status}, "Created")
    assert created is not None
    assert created["reason"] == "JobCreated"


def test_trainer_pod_is_admitted_under_restricted_pod_security(
    cluster: Cluster, namespace: str, quickstart: Obj
) -> None:
    """The namespace enforces the restricted Pod Security Standard; the Job controller can
    create the trainer pod there (it need not be scheduled or run)."""
    name = quickstart["metadata"]["name"]
    pods = wait_for(
        lambda: cluster.pods(namespace, f"{JOB_LABEL}={job_label(name)}"),
        f"a pod of Job {job_name(name)}",
        timeout=CHILD_TIMEOUT,
        detail=lambda: [
            (e.get("reason"), e.get("message")) for e in cluster.events(namespace, job_name(name))
        ],
    )
    pod = pods[0]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_a_run_of_two_pods_is_an_indexed_job_behind_a_headless_service(
    cluster: Cluster, operator: Operator, namespace: str
) -> None:
    """The API server accepts the Indexed Job and the headless Service; the Job controller
    creates one pod per index with hostname <Job>-<index> under the Service's subdomain and
    JOB_COMPLETION_INDEX, and the pods carry the launcher's variables."""
    body = quickstart_body(namespace, "group")
    body["spec"]["resources"] = {"gpus": 0, "nodes": 2}
    cluster.create_ftj(namespace, body)
    job = wait_for(
        lambda: cluster.job(namespace, job_name("group")), "the group's Job", timeout=CHILD_TIMEOUT
    )
    service = cluster.service(namespace, service_name("group"))
    assert service is not None
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    uid = (cluster.ftj(namespace, "group") or {})["metadata"]["uid"]
    assert controller_ref(service)["uid"] == controller_ref(job)["uid"] == uid
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    template = job["spec"]["template"]["spec"]
    assert template["subdomain"] == service_name("group")
    env = {e["name"]: e.get("value") for e in container(job)["env"]}
    assert env["PET_NNODES"] == "2"
    assert (
        env["PET_MASTER_ADDR"] == f"{job_name('group')}-0.{service_name('group')}.{namespace}.svc"
    )

    def both_pods() -> list[Obj] | None:
        found = cluster.pods(namespace, f"{JOB_LABEL}={job_label('group')}")
        return found if len(found) == 2 else None

    pods = wait_for(both_pods, "two pods", timeout=CHILD_TIMEOUT)
    hostnames = sorted(p["spec"]["hostname"] for p in pods)
    assert hostnames == [f"{job_name('group')}-0", f"{job_name('group')}-1"]
    indexes = sorted(
        p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods
    )
    assert indexes == ["0", "1"]
    for pod in pods:  # the Job controller's own variable: the trainer's node rank
        assert "JOB_COMPLETION_INDEX" in {e["name"] for e in pod["spec"]["containers"][0]["env"]}
        assert pod["spec"]["subdomain"] == service_name("group")
    cluster.delete_ftj(namespace, "group")


# --------------------------------------------------------------------------------------------
# invalid specs: refused by the API server (CEL) or by the operator (policy)
# --------------------------------------------------------------------------------------------
CEL_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("cel-output-uri", "spec.output.uri", {"output": {"uri": "outputs/local-dir"}}),
    ("cel-method-lora", "spec.method.lora", {"method": {"type": "full", "lora": {"r": 8}}}),
]


@pytest.mark.parametrize(("name", "field", "change"), CEL_CASES, ids=[c[1] for c in CEL_CASES])
def test_cel_rules_reject_invalid_specs_at_admission(
    cluster: Cluster, crd: Obj, namespace: str, name: str, field: str, change: dict[str, Any]
) -> None:
    """The CRD's x-kubernetes-validations run in the real API server: 422, message names the
    field, nothing is stored."""
    body = quickstart_body(namespace, name)
    body["spec"].update(change)
    with pytest.raises(ApiException) as info:
        cluster.create_ftj(namespace, body)
    assert info.value.status == 422, api_error_text(info.value)
    assert field in api_error_text(info.value)
    assert cluster.ftj(namespace, name) is None


def test_policy_violation_fails_with_invalid_spec_and_no_job(
    cluster: Cluster, operator: Operator, namespace: str
) -> None:
    """trustRemoteCode: true passes the CRD but not the platform policy (not allowed by
    default): phase Failed, condition Failed/InvalidSpec naming the field, a Warning event,
    and no ConfigMap or Job."""
    name = "untrusted-code"
    body = quickstart_body(namespace, name)
    body["spec"]["model"]["trustRemoteCode"] = True
    cluster.create_ftj(namespace, body)

    def failed() -> Obj | None:
        status = status_of(cluster, namespace, name)
        cond = condition({"status": status}, "Failed")
        if status.get("phase") == "Failed" and cond and cond.get("status") == "True":
            return cond
        return None

    cond = wait_for(
        failed,
        f"FineTuneJob {name} to fail",
        timeout=CHILD_TIMEOUT,
        detail=lambda: status_of(cluster, namespace, name),
    )
    assert cond["reason"] == "InvalidSpec"
    assert "spec.model.trustRemoteCode" in cond["message"]
    wait_for(
        lambda: [
            e
            for e in cluster.events(namespace, name)
            if e.get("reason") == "InvalidSpec" and e.get("type") == "Warning"
        ],
        "a Warning event InvalidSpec",
        timeout=30,
        detail=lambda: [(e.get("type"), e.get("reason")) for e in cluster.events(namespace, name)],
    )
    time.sleep(3)  # several poll intervals: nothing may appear late either
    assert cluster.job(namespace, job_name(name)) is None
    assert cluster.configmap(namespace, configmap_name(name)) is None
    assert status_of(cluster, namespace, name)["phase"] == "Failed"


def test_training_part_of_the_spec_is_immutable(
    cluster: Cluster, namespace: str, quickstart: Obj
) -> None:
    """A change to spec.training is refused by the API server's transition rule."""
    name = quickstart["metadata"]["name"]
    with pytest.raises(ApiException) as info:
        cluster.patch_ftj(namespace, name, {"spec": {"training": {"learningRate": 0.01}}})
    assert info.value.status == 422, api_error_text(info.value)
    assert "spec.training is immutable" in api_error_text(info.value)
    current = cluster.ftj(namespace, name)
    assert current is not None
    assert current["spec"]["training"]["learningRate"] == 0.001


# --------------------------------------------------------------------------------------------
# the CLI against the cluster
# --------------------------------------------------------------------------------------------
def test_cli_list_and_status(cluster: Cluster, namespace: str, quickstart: Obj) -> None:
    """`finetune list -n NS` and `finetune status NAME -n NS` exit 0 and show name and phase."""
    name = quickstart["metadata"]["name"]
    before = status_of(cluster, namespace, name).get("phase")
    listing = run_cli("list", "-n", namespace)
    shown = run_cli("status", name, "-n", namespace)
    after = status_of(cluster, namespace, name).get("phase")
    phases = {str(p) for p in (before, after) if p}
    assert phases, "the FineTuneJob has no phase"

    assert listing.returncode == 0, listing.stdout + listing.stderr
    assert name in listing.stdout
    assert any(p in listing.stdout for p in phases), (phases, listing.stdout)

    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert name in shown.stdout
    assert any(f"phase: {p}" in shown.stdout for p in phases), (phases, shown.stdout)
    assert "Created" in shown.stdout


# --------------------------------------------------------------------------------------------
# suspend / resume
# --------------------------------------------------------------------------------------------
def test_suspend_and_resume(cluster: Cluster, namespace: str, quickstart: Obj) -> None:
    """spec.suspend true -> the Job is suspended and the phase is Suspended; false -> resumed."""
    name = quickstart["metadata"]["name"]

    def job_suspend() -> bool:
        job = cluster.job(namespace, job_name(name)) or {}
        return bool((job.get("spec") or {}).get("suspend"))

    cluster.patch_ftj(namespace, name, {"spec": {"suspend": True}})
    try:
        wait_for(job_suspend, "the Job's spec.suspend to become true", timeout=CHILD_TIMEOUT)
        wait_for(
            lambda: status_of(cluster, namespace, name).get("phase") == "Suspended",
            "phase Suspended",
            timeout=CHILD_TIMEOUT,
            detail=lambda: status_of(cluster, namespace, name),
        )
        cond = condition(cluster.ftj(namespace, name), "Suspended")
        assert cond is not None
        assert (cond["status"], cond["reason"]) == ("True", "SuspendedByUser")
    finally:
        cluster.patch_ftj(namespace, name, {"spec": {"suspend": False}})
    wait_for(
        lambda: not job_suspend(), "the Job's spec.suspend to become false", timeout=CHILD_TIMEOUT
    )
    wait_for(
        lambda: status_of(cluster, namespace, name).get("phase") not in (None, "Suspended"),
        "the phase to leave Suspended",
        timeout=CHILD_TIMEOUT,
        detail=lambda: status_of(cluster, namespace, name),
    )


# --------------------------------------------------------------------------------------------
# deletion: the cluster's garbage collector removes the children
# --------------------------------------------------------------------------------------------
def test_deleting_the_finetunejob_garbage_collects_its_children(
    cluster: Cluster, operator: Operator, namespace: str
) -> None:
    """Deleting a FineTuneJob removes it (it carries no finalizer) and the real garbage
    collector deletes its Job and ConfigMap."""
    name = "gc-check"
    created = cluster.create_ftj(namespace, quickstart_body(namespace, name))
    uid = created["metadata"]["uid"]
    job = wait_for(
        lambda: cluster.job(namespace, job_name(name)),
        f"Job {job_name(name)}",
        timeout=CHILD_TIMEOUT,
        detail=lambda: status_of(cluster, namespace, name),
    )
    configmap = wait_for(
        lambda: cluster.configmap(namespace, configmap_name(name)),
        f"ConfigMap {configmap_name(name)}",
        timeout=CHILD_TIMEOUT,
    )
    assert controller_ref(job)["uid"] == uid
    assert controller_ref(configmap)["uid"] == uid

    cluster.delete_ftj(namespace, name)
    wait_for(
        lambda: cluster.ftj(namespace, name) is None,
        f"FineTuneJob {name} to be deleted",
        timeout=GC_TIMEOUT,
        detail=lambda: (cluster.ftj(namespace, name) or {}).get("metadata"),
    )

    def gone(read: Callable[[str, str], Obj | None], child: Obj) -> bool:
        current = read(namespace, child["metadata"]["name"])
        return current is None or current["metadata"]["uid"] != child["metadata"]["uid"]

    wait_for(lambda: gone(cluster.job, job), "the Job to be garbage-collected", timeout=GC_TIMEOUT)
    wait_for(
        lambda: gone(cluster.configmap, configmap),
        "the ConfigMap to be garbage-collected",
        timeout=GC_TIMEOUT,
    )
