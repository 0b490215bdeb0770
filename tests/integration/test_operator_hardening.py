"""The cluster path under hostile input: long names, API errors, deletion without the operator,
edited TTLs, claims only named in dataset.mix, and a harness strict enough to catch them."""

from __future__ import annotations

import time
from typing import Any

import pytest
from finetune_operator.api import parse_spec
from finetune_operator.builders import JOB_LABEL, build_configmap, build_job
from finetune_operator.names import configmap_name, job_name
from finetune_operator.policy import Policy
from harness import operator_runner
from kubernetes_asyncio.client.exceptions import ApiException
from rest import core_path, custom_path, jobs_path
from test_operator_lifecycle import condition, phase, spec

FAST = {"FAKE_STEPS": "3", "FAKE_STEP_SECONDS": "0.05"}
LONG_NAMES = [
    "x" * 63 + "-" + "y" * 36,
    "a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 61,
]


def creations(cluster: Any, what: str) -> int:
    return int(cluster.emulator.counts.get(f"CREATE {what}", 0))


@pytest.mark.parametrize("name", LONG_NAMES, ids=["100-chars", "253-chars"])
def test_a_long_name_gets_valid_children_and_succeeds(cluster, kubelet, operator, name) -> None:
    """A 100- or 253-character name is valid for a FineTuneJob but not for its Job (the pods'
    job-name label): the Job gets a hash-shortened name, and the run goes through."""
    assert len(name) in (100, 253)
    with pytest.raises(ApiException) as refused:  # the emulator is as strict as the API server
        cluster.create(jobs_path("default"), _job_named(name))
    assert refused.value.status == 422
    kubelet.env.update(FAST)
    cluster.apply_ftj(name, spec())
    cluster.wait_for(lambda: phase(cluster, name) == "Succeeded", what="Succeeded")
    job = cluster.job(job_name(name))
    assert job is not None and len(job["metadata"]["name"]) <= 63
    assert job["metadata"]["labels"][JOB_LABEL] == job_name(name)
    assert cluster.get(core_path("default", "configmaps", configmap_name(name))) is not None
    assert cluster.ftj(name)["status"]["jobName"] == job_name(name)
    assert len(cluster.pods(name)) == 1


def _job_named(name: str) -> dict[str, Any]:
    job = build_job(name, "default", parse_spec(spec()), Policy())
    job["metadata"]["name"] = name  # what the operator created before names were bounded
    return job


def test_a_refused_child_fails_with_the_servers_message(cluster, kubelet, operator) -> None:
    """422 (or 400, 404) will not go away by itself: Failed/ChildRejected with the API server's
    message and a Warning event, at once, and no retry loop."""
    message = 'Job.batch "refused" is invalid: spec.template.spec.nodeSelector: Invalid value'
    cluster.emulator.faults[("CREATE", "jobs")] = (422, "Invalid", message)
    cluster.apply_ftj("refused", spec())
    cluster.wait_for(lambda: phase(cluster, "refused") == "Failed", what="Failed")
    cond = condition(cluster, "refused", "Failed")
    assert cond["reason"] == "ChildRejected"
    assert "422 Invalid" in cond["message"] and message in cond["message"]
    cluster.wait_for(
        lambda: [e for e in cluster.events("refused") if e.get("reason") == "ChildRejected"],
        what="a ChildRejected event",
    )
    tries = creations(cluster, "jobs")
    time.sleep(1.5)  # several poll intervals: no retries
    assert creations(cluster, "jobs") == tries == 1


def test_a_forbidden_child_is_blocked_until_it_is_allowed(cluster, kubelet, operator) -> None:
    """403 (RBAC, ResourceQuota, a terminating namespace) may clear up: Running=False/Blocked
    with the server's message, retried with backoff, and the run goes on once allowed."""
    kubelet.env.update(FAST)
    message = 'jobs.batch "quota" is forbidden: exceeded quota: jobs, requested: count/jobs.batch=1'
    cluster.emulator.faults[("CREATE", "jobs")] = (403, "Forbidden", message)
    cluster.apply_ftj("quota", spec())
    cond = cluster.wait_for(
        lambda: (c := condition(cluster, "quota", "Running")) and c["reason"] == "Blocked" and c,
        what="Running=False/Blocked",
    )
    assert cond["status"] == "False" and message in cond["message"]
    assert phase(cluster, "quota") == "Pending"
    cluster.wait_for(lambda: creations(cluster, "jobs") >= 3, what="retries")
    del cluster.emulator.faults[("CREATE", "jobs")]
    cluster.wait_for(lambda: phase(cluster, "quota") == "Succeeded", timeout=60, what="Succeeded")


@pytest.mark.parametrize("code", [500, 429, 409])
def test_transient_errors_are_retried(cluster, kubelet, operator, code: int) -> None:
    """5xx, 429 and a 409 whose object then cannot be read: retried, never a failure."""
    kubelet.env.update(FAST)
    cluster.emulator.faults[("CREATE", "configmaps")] = (code, "Transient", "try again later")
    if code == 409:  # the "existing" ConfigMap is not there when read back
        cluster.emulator.faults[("FETCH", "configmaps")] = (404, "NotFound", "not found")
    cluster.apply_ftj("flaky-api", spec())
    cluster.wait_for(lambda: creations(cluster, "configmaps") >= 3, what="retries")
    assert phase(cluster, "flaky-api") in (None, "Pending")
    cluster.emulator.faults.clear()
    cluster.wait_for(lambda: phase(cluster, "flaky-api") == "Succeeded", what="Succeeded")


def test_deleting_while_the_operator_is_down_completes(cluster, kubelet) -> None:
    """No finalizer: a FineTuneJob deleted while the operator is stopped is gone at once, and
    its children go by garbage collection."""
    kubelet.env.update({"FAKE_STEPS": "100", "FAKE_STEP_SECONDS": "0.2"})
    with operator_runner():
        cluster.apply_ftj("orphan", spec())
        cluster.wait_for(lambda: phase(cluster, "orphan") == "Running", what="Running")
    assert not cluster.ftj("orphan")["metadata"].get("finalizers")
    cluster.delete(custom_path("default", "orphan"))
    cluster.wait_for(lambda: cluster.ftj("orphan") is None, timeout=5, what="FineTuneJob gone")
    cluster.wait_for(lambda: cluster.job("orphan") is None, what="Job collected")
    cluster.wait_for(lambda: not cluster.pods("orphan"), what="pods collected")


def test_the_finalizer_of_earlier_versions_is_removed(cluster, kubelet) -> None:
    """A FineTuneJob created under a version that used a kopf daemon carries its finalizer;
    the operator removes it, and deletion no longer needs the operator."""
    kubelet.env.update(FAST)
    cluster.apply_ftj("legacy", spec())
    cluster.patch(
        custom_path("default", "legacy"), {"metadata": {"finalizers": ["finetune.dev/finalizer"]}}
    )
    with operator_runner():
        cluster.wait_for(
            lambda: not cluster.ftj("legacy")["metadata"].get("finalizers"),
            what="finalizer removed",
        )
        cluster.wait_for(lambda: phase(cluster, "legacy") == "Succeeded", what="Succeeded")
    cluster.delete(custom_path("default", "legacy"))
    cluster.wait_for(lambda: cluster.ftj("legacy") is None, timeout=5, what="FineTuneJob gone")


@pytest.mark.parametrize("before", [3600, None], ids=["shortened", "set-after-finish"])
def test_ttl_edited_after_the_run_finished_applies(cluster, kubelet, operator, before) -> None:
    """ttlSecondsAfterFinished is read from the object as it is now, not as it was."""
    kubelet.env.update(FAST)
    extra = {} if before is None else {"ttlSecondsAfterFinished": before}
    cluster.apply_ftj("ttl-edit", spec(**extra))
    cluster.wait_for(lambda: phase(cluster, "ttl-edit") == "Succeeded", what="Succeeded")
    time.sleep(1.0)
    assert cluster.ftj("ttl-edit") is not None
    cluster.patch(custom_path("default", "ttl-edit"), {"spec": {"ttlSecondsAfterFinished": 1}})
    cluster.wait_for(lambda: cluster.ftj("ttl-edit") is None, what="deleted after the new TTL")


def _with_mix(kubelet: Any) -> dict[str, Any]:
    """The lifecycle spec plus dataset.mix from claim `general` (which holds the file)."""
    (kubelet.pvc_root / "general").mkdir()
    (kubelet.pvc_root / "general" / "mix.jsonl").write_text("{}\n")
    mixed = spec()
    mix = [{"source": "pvc://general/mix.jsonl", "fraction": 0.5}]
    mixed["dataset"] = {**mixed["dataset"], "mix": mix}
    return mixed


def test_a_claim_named_only_in_dataset_mix_is_mounted(cluster, kubelet, operator) -> None:
    """Every Uri field is mounted, dataset.mix[].source too: the stand-in trainer exits 65 for
    any source it cannot see."""
    kubelet.env.update(FAST)
    cluster.apply_ftj("mixed", _with_mix(kubelet))
    cluster.wait_for(lambda: phase(cluster, "mixed") in ("Succeeded", "Failed"), what="finished")
    assert phase(cluster, "mixed") == "Succeeded", condition(cluster, "mixed", "Failed")
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in cluster.job("mixed")["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert "general" in claims


def test_the_harness_hides_claims_the_pod_does_not_mount(cluster, kubelet) -> None:
    """The control for the test above: a pod whose spec lacks a claim cannot read it."""
    mixed = _with_mix(kubelet)
    job = build_job("unmounted", "default", parse_spec(mixed), Policy())
    pod = job["spec"]["template"]["spec"]
    pod["volumes"] = [v for v in pod["volumes"] if v["name"] != "pvc-general"]
    pod["containers"][0]["volumeMounts"] = [
        m for m in pod["containers"][0]["volumeMounts"] if m["name"] != "pvc-general"
    ]
    configmap = build_configmap("unmounted", "default", parse_spec(mixed))
    cluster.create(core_path("default", "configmaps"), configmap)
    cluster.create(jobs_path("default"), job)

    def failed() -> dict[str, Any] | None:
        return next(
            (
                c
                for c in ((cluster.job("unmounted") or {}).get("status") or {}).get("conditions")
                or []
                if c["type"] == "Failed"
            ),
            None,
        )

    cond = cluster.wait_for(failed, what="the Job to fail")
    assert cond["reason"] == "PodFailurePolicy"  # exit 65: the source was not there
    terminated = cluster.pods("unmounted")[0]["status"]["containerStatuses"][0]["state"]
    assert "pvc://general/mix.jsonl not found" in terminated["terminated"]["message"]
