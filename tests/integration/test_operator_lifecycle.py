"""The real kopf operator against kmock's Kubernetes emulator and the local kubelet."""

from __future__ import annotations

import copy
import time
from typing import Any

import pytest
from harness import operator_runner
from rest import core_path, custom_path

SPEC: dict[str, Any] = {
    "model": {"source": "pvc://models/tiny-llama"},
    "dataset": {"source": "pvc://data/train.jsonl", "format": "alpaca"},
    "method": {"type": "lora"},
    "training": {"maxSteps": 10},
    "output": {"uri": "pvc://outputs/run1"},
    "resources": {"gpus": 0, "cpu": "1", "memory": "2Gi"},
}


def spec(**overrides: Any) -> dict[str, Any]:
    out = copy.deepcopy(SPEC)
    out.update(overrides)
    return out


def phase(cluster, name: str, namespace: str = "default") -> str | None:
    obj = cluster.ftj(name, namespace) or {}
    return (obj.get("status") or {}).get("phase")


def condition(cluster, name: str, type_: str) -> dict[str, Any] | None:
    obj = cluster.ftj(name) or {}
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c
    return None


def test_apply_creates_configmap_and_job_once_and_succeeds(cluster, kubelet, operator) -> None:
    cluster.apply_ftj("run1", spec())
    job = cluster.wait_for(lambda: cluster.job("run1"), what="Job")
    cm = cluster.get(core_path("default", "configmaps", "run1-config"))
    assert cm is not None and "config.json" in cm["data"]
    ftj = cluster.ftj("run1")
    for child in (job, cm):
        refs = child["metadata"]["ownerReferences"]
        assert refs[0]["uid"] == ftj["metadata"]["uid"] and refs[0]["controller"] is True
        assert child["metadata"]["labels"]["finetune.dev/job"] == "run1"
    cluster.wait_for(lambda: phase(cluster, "run1") == "Succeeded", what="Succeeded")
    status = cluster.ftj("run1")["status"]
    assert status["result"]["adapterUri"] == "pvc://outputs/run1/adapter"
    assert status["result"]["metrics"]["evalLoss"] == 0.5
    assert (kubelet.pvc_root / "outputs/run1/adapter/adapter_config.json").exists()
    assert status["jobName"] == "run1"
    assert status["completionTime"]
    assert condition(cluster, "run1", "Succeeded")["status"] == "True"
    assert any(c["best"] for c in status["checkpoints"])
    assert cluster.count("batch/v1/jobs", "default", "run1") == 1
    assert cluster.count("v1/configmaps", "default", "run1-config") == 1
    # no finalizer (deletion never waits for the operator) and no kopf bookkeeping anywhere
    meta = cluster.ftj("run1")["metadata"]
    assert not meta.get("finalizers")
    assert not meta.get("annotations")
    assert not [k for k in status if k.startswith("kopf")]
    assert not kubelet.errors


def test_invalid_spec_fails_with_field_path_and_no_job(cluster, kubelet, operator) -> None:
    bad = spec(method={"type": "qlora"})  # qlora with gpus: 0
    cluster.apply_ftj("bad", bad)
    cluster.wait_for(lambda: phase(cluster, "bad") == "Failed", what="Failed")
    cond = condition(cluster, "bad", "Failed")
    assert cond["status"] == "True" and cond["reason"] == "InvalidSpec"
    assert "spec.resources.gpus" in cond["message"]
    cluster.wait_for(
        lambda: [e for e in cluster.events("bad") if e.get("reason") == "InvalidSpec"],
        what="InvalidSpec event",
    )
    time.sleep(1.0)  # no retry loop, no children
    assert cluster.job("bad") is None
    assert cluster.get(core_path("default", "configmaps", "bad-config")) is None
    assert len([e for e in cluster.events("bad") if e.get("reason") == "InvalidSpec"]) == 1


def test_policy_violations_are_invalid_spec(cluster, kubelet, monkeypatch) -> None:
    monkeypatch.setenv("FINETUNE_MAX_GPUS_PER_JOB", "2")
    monkeypatch.setenv("FINETUNE_ALLOWED_NAMESPACES", "default,ml")
    with operator_runner():
        greedy = spec(resources={"gpus": 4})
        greedy["model"]["trustRemoteCode"] = True
        cluster.apply_ftj("greedy", greedy)
        cluster.apply_ftj("elsewhere", spec(), namespace="other")
        cluster.wait_for(lambda: phase(cluster, "greedy") == "Failed", what="greedy Failed")
        message = condition(cluster, "greedy", "Failed")["message"]
        assert "spec.resources.gpus: 4 GPUs exceeds the platform maximum of 2" in message
        assert "spec.model.trustRemoteCode" in message
        cluster.wait_for(
            lambda: phase(cluster, "elsewhere", "other") == "Failed", what="elsewhere Failed"
        )
        other = cluster.ftj("elsewhere", "other")["status"]["conditions"]
        assert any("metadata.namespace" in c["message"] for c in other)
        assert cluster.job("greedy") is None and cluster.job("elsewhere", "other") is None


def test_progress_is_mirrored_into_status(cluster, kubelet, operator) -> None:
    kubelet.env.update({"FAKE_STEPS": "40", "FAKE_STEP_SECONDS": "0.2"})
    cluster.apply_ftj("live", spec())

    def running_with_progress() -> dict[str, Any] | None:
        status = (cluster.ftj("live") or {}).get("status") or {}
        progress = status.get("progress") or {}
        ok = status.get("phase") == "Running" and progress.get("step", 0) >= 6
        return status if ok else None

    status = cluster.wait_for(running_with_progress, what="progress in status")
    progress = status["progress"]
    assert progress["totalSteps"] == 40
    assert 0 < progress["percent"] < 100
    assert progress["loss"] == pytest.approx(3.0 / progress["step"])
    assert progress["eta"] and progress["tokensPerSecond"] == 1234.5
    assert status["checkpoints"] and status["checkpoints"][0]["uri"].startswith(
        "pvc://outputs/run1/checkpoints/checkpoint-"
    )
    assert condition(cluster, "live", "Running")["status"] == "True"
    cluster.wait_for(lambda: phase(cluster, "live") == "Succeeded", timeout=30, what="Succeeded")
    final = cluster.ftj("live")["status"]["progress"]
    assert final["percent"] == 100.0


def test_invalid_input_exit_fails_with_trainer_message(cluster, kubelet, operator) -> None:
    kubelet.env["FAKE_OUTCOME"] = "invalid"
    cluster.apply_ftj("baddata", spec())
    cluster.wait_for(lambda: phase(cluster, "baddata") == "Failed", what="Failed")
    cond = condition(cluster, "baddata", "Failed")
    assert cond["reason"] == "InvalidInput"
    assert "line 3" in cond["message"] and "line 7" in cond["message"]
    assert len(cluster.pods("baddata")) == 1  # FailJob: no retries
    cluster.wait_for(
        lambda: [e for e in cluster.events("baddata") if e.get("type") == "Warning"],
        what=f"Warning event in {cluster.events('baddata')}",
    )


def test_crash_retries_until_backoff_limit(cluster, kubelet, operator) -> None:
    kubelet.env.update({"FAKE_OUTCOME": "crash", "FAKE_STEPS": "4", "FAKE_STEP_SECONDS": "0.05"})
    cluster.apply_ftj("flaky", spec(backoffLimit=1))
    cluster.wait_for(lambda: phase(cluster, "flaky") == "Failed", what="Failed")
    cond = condition(cluster, "flaky", "Failed")
    assert cond["reason"] == "BackoffLimitExceeded"
    assert "CUDA error: boom" in cond["message"]
    assert cluster.ftj("flaky")["status"]["attempts"] == 2


def test_operator_restart_mid_job_keeps_one_job(cluster, kubelet) -> None:
    kubelet.env.update({"FAKE_STEPS": "30", "FAKE_STEP_SECONDS": "0.2"})
    with operator_runner():
        cluster.apply_ftj("survivor", spec())
        cluster.wait_for(lambda: phase(cluster, "survivor") == "Running", what="Running")
    with operator_runner():
        cluster.wait_for(
            lambda: phase(cluster, "survivor") == "Succeeded", timeout=30, what="Succeeded"
        )
    assert cluster.count("batch/v1/jobs", "default", "survivor") == 1
    assert cluster.count("v1/configmaps", "default", "survivor-config") == 1
    assert len(cluster.pods("survivor")) == 1


def test_suspend_then_resume_continues_from_checkpoint(cluster, kubelet, operator) -> None:
    kubelet.env.update({"FAKE_STEPS": "30", "FAKE_STEP_SECONDS": "0.15"})
    cluster.apply_ftj("pausable", spec())

    def stepped() -> bool:
        progress = ((cluster.ftj("pausable") or {}).get("status") or {}).get("progress") or {}
        return progress.get("step", 0) >= 8

    cluster.wait_for(stepped, what="training progress")
    cluster.patch(custom_path("default", "pausable"), {"spec": {"suspend": True}})
    cluster.wait_for(lambda: phase(cluster, "pausable") == "Suspended", what="Suspended")
    suspended = condition(cluster, "pausable", "Suspended")
    assert suspended["reason"] == "SuspendedByUser"
    assert cluster.ftj("pausable")["metadata"]["generation"] == 2
    assert suspended["observedGeneration"] == 2
    assert cluster.job("pausable")["spec"]["suspend"] is True
    cluster.wait_for(lambda: not cluster.pods("pausable"), what="pods gone")
    saved = sorted((kubelet.pvc_root / "outputs/run1/checkpoints").iterdir())
    assert saved, "the trainer saved a checkpoint on SIGTERM"

    cluster.patch(custom_path("default", "pausable"), {"spec": {"suspend": False}})
    cluster.wait_for(lambda: phase(cluster, "pausable") == "Succeeded", what="Succeeded")
    status = cluster.ftj("pausable")["status"]
    assert condition(cluster, "pausable", "Suspended")["status"] == "False"
    assert status["attempts"] == 2
    # the resumed attempt started from the checkpoint, not from step 0
    resumed_log = max(kubelet.tmp.glob("*/log.txt"), key=lambda p: p.stat().st_mtime)
    assert resumed_log.exists()
    assert cluster.count("batch/v1/jobs", "default", "pausable") == 1


def test_ttl_deletes_finished_job_and_children(cluster, kubelet, operator) -> None:
    kubelet.env.update({"FAKE_STEPS": "3", "FAKE_STEP_SECONDS": "0.05"})
    cluster.apply_ftj("shortlived", spec(ttlSecondsAfterFinished=1))
    cluster.wait_for(lambda: phase(cluster, "shortlived") == "Succeeded", what="Succeeded")
    cluster.wait_for(lambda: cluster.ftj("shortlived") is None, what="FineTuneJob deleted")
    cluster.wait_for(lambda: cluster.job("shortlived") is None, what="Job collected")
    time.sleep(1.0)  # no recreate loop
    assert cluster.job("shortlived") is None
    assert cluster.count("batch/v1/jobs", "default", "shortlived") == 1
    assert "ttlSecondsAfterFinished" not in cluster.call(_history_job(cluster, "shortlived"))


async def _history_job(cluster, name: str) -> str:
    import json

    import kmock

    for (res, _, n), obj in cluster.emulator.objects.items():
        if res == kmock.resource("batch/v1/jobs") and n == name:
            return json.dumps([v.raw for v in obj.history if v is not None])
    return ""


def test_deleting_the_finetunejob_collects_children(cluster, kubelet, operator) -> None:
    kubelet.env.update({"FAKE_STEPS": "100", "FAKE_STEP_SECONDS": "0.2"})
    cluster.apply_ftj("doomed", spec())
    cluster.wait_for(lambda: phase(cluster, "doomed") == "Running", what="Running")
    cluster.delete(custom_path("default", "doomed"))
    cluster.wait_for(lambda: cluster.ftj("doomed") is None, what="FineTuneJob gone")
    cluster.wait_for(lambda: cluster.job("doomed") is None, what="Job collected")
    cluster.wait_for(
        lambda: cluster.get(core_path("default", "configmaps", "doomed-config")) is None,
        what="ConfigMap collected",
    )


def test_name_conflict_with_someone_elses_object(cluster, kubelet, operator) -> None:
    cluster.create(
        core_path("default", "configmaps"),
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "taken-config"}},
    )
    cluster.apply_ftj("taken", spec())
    cluster.wait_for(lambda: phase(cluster, "taken") == "Failed", what="Failed")
    cond = condition(cluster, "taken", "Failed")
    assert cond["reason"] == "NameConflict" and "taken-config" in cond["message"]
    assert cluster.job("taken") is None


def test_kueue_admits_a_queued_job(cluster, kubelet, operator) -> None:
    """With queueName the Job is created suspended and only Kueue unsuspends it: resuming the
    FineTuneJob never bypasses the queue."""
    kubelet.env.update({"FAKE_STEPS": "5", "FAKE_STEP_SECONDS": "0.05"})
    cluster.apply_ftj("queued", spec(queueName="gpu-team"))
    job = cluster.wait_for(lambda: cluster.job("queued"), what="Job")
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-team"
    cluster.wait_for(lambda: phase(cluster, "queued") == "Suspended", what="Suspended")
    assert condition(cluster, "queued", "Suspended")["reason"] == "WaitingForQueue"

    cluster.patch(custom_path("default", "queued"), {"spec": {"suspend": True}})
    cluster.wait_for(
        lambda: condition(cluster, "queued", "Suspended")["reason"] == "SuspendedByUser",
        what="SuspendedByUser",
    )
    cluster.patch(custom_path("default", "queued"), {"spec": {"suspend": False}})
    cluster.wait_for(
        lambda: condition(cluster, "queued", "Suspended")["reason"] == "WaitingForQueue",
        what="back to WaitingForQueue",
    )
    time.sleep(1)  # the operator had time to (wrongly) unsuspend it
    assert cluster.job("queued")["spec"]["suspend"] is True

    cluster.patch("/apis/batch/v1/namespaces/default/jobs/queued", {"spec": {"suspend": False}})
    cluster.wait_for(lambda: phase(cluster, "queued") == "Succeeded", what="Succeeded")
