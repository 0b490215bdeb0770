"""A run of two pods (an Indexed Job behind a headless Service) with the real trainer: the
harness runs both pods as local processes that meet on loopback, as two nodes would."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from finetune_operator.names import job_name, service_name
from harness import Kubelet, operator_runner
from rest import core_path

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _spec(**training: Any) -> dict[str, Any]:
    return {
        "model": {"source": "pvc://models/tiny"},
        "dataset": {"source": "pvc://data/train.jsonl", "format": "alpaca", "maxSeqLength": 256},
        "method": {"type": "lora", "lora": {"r": 4, "alpha": 8}},
        "training": {
            "maxSteps": 6,
            "batchSize": 2,
            "learningRate": 0.001,
            "saveSteps": 3,
            "loggingSteps": 1,
            "precision": "fp32",
            **training,
        },
        "output": {"uri": "pvc://outputs/group"},
        "resources": {"gpus": 0, "nodes": 2, "cpu": "2", "memory": "4Gi"},
    }


@pytest.fixture()
def group_kubelet(cluster: Any, tmp_path: Path, tiny_model_dir: Path) -> Any:
    k = Kubelet(cluster, tmp_path / "kubelet")  # the pods' own command: the real trainer
    shutil.copytree(tiny_model_dir, k.pvc_root / "models" / "tiny")
    (k.pvc_root / "data").mkdir(parents=True)
    shutil.copy(
        REPO / "examples" / "data" / "instructions.jsonl", k.pvc_root / "data" / "train.jsonl"
    )
    k.start()
    yield k
    k.stop()


def _phase(cluster: Any, name: str) -> str | None:
    return ((cluster.ftj(name) or {}).get("status") or {}).get("phase")


def test_two_pods_train_as_one_group_and_rank_zero_writes_the_outputs(
    cluster: Any, group_kubelet: Kubelet
) -> None:
    name = "group"
    with operator_runner():
        cluster.apply_ftj(name, _spec())
        job = cluster.wait_for(lambda: cluster.job(job_name(name)), timeout=60, what="Job")
        assert job["spec"]["completionMode"] == "Indexed"
        assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
        service = cluster.get(core_path("default", "services", service_name(name)))
        assert service is not None and service["spec"]["clusterIP"] == "None"
        owner = cluster.ftj(name)["metadata"]["uid"]
        assert service["metadata"]["ownerReferences"][0]["uid"] == owner
        cluster.wait_for(
            lambda: (
                ((cluster.ftj(name).get("status") or {}).get("workers") or {}).get("ready") == 2
            ),
            timeout=240,
            what="both pods running",
        )
        cluster.wait_for(
            lambda: _phase(cluster, name) in ("Succeeded", "Failed"), timeout=300, what="finished"
        )
        status = cluster.ftj(name)["status"]
        assert status["phase"] == "Succeeded", (status["conditions"], group_kubelet.logs()[-4000:])
        assert status["workers"]["total"] == 2 and status["workers"]["worldSize"] == 2
        assert status["result"]["adapterUri"] == "pvc://outputs/group/adapter"
        assert status["checkpoints"][-1]["worldSize"] == 2
    pods = cluster.pods(job_name(name))
    indexes = sorted(
        p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods
    )
    assert indexes == ["0", "1"]
    out = group_kubelet.pvc_root / "outputs" / "group"
    steps = [json.loads(line)["step"] for line in (out / "history.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == sorted(set(s for s in steps if s))  # once each: rank 0 wrote
    assert (out / "adapter" / "adapter_model.safetensors").exists()
