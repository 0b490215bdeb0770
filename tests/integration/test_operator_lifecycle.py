"""The real kopf operator against kmock's Kubernetes emulator and the local kubelet."""

from __future__ import annotations

import copy
from typing import Any

from finetune_operator.kube import core_path

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


def phase(cluster, name: str) -> str | None:
    obj = cluster.ftj(name) or {}
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
    # kopf's bookkeeping lives in finetune.dev annotations and the finetune.dev finalizer
    meta = cluster.ftj("run1")["metadata"]
    assert all(f.startswith("finetune.dev/") for f in meta.get("finalizers", []))
    annotations = meta.get("annotations") or {}
    assert any(k.startswith("finetune.dev/") for k in annotations), annotations
    assert not [k for k in annotations if k.startswith("kopf.zalando.org")]
    assert not [k for k in status if k.startswith("kopf")]
    assert not kubelet.errors
