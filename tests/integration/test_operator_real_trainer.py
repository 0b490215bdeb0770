"""The operator running the real trainer (`python -m finetune_trainer`) on a tiny model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from harness import Kubelet, operator_runner

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _spec(dataset: str) -> dict:
    return {
        "model": {"source": "pvc://models/tiny"},
        "dataset": {"source": f"pvc://data/{dataset}", "format": "alpaca", "maxSeqLength": 256},
        "method": {"type": "lora", "lora": {"r": 4, "alpha": 8}},
        "training": {
            "maxSteps": 4,
            "batchSize": 2,
            "learningRate": 0.001,
            "saveSteps": 2,
            "loggingSteps": 1,
            "precision": "fp32",
        },
        "output": {"uri": "pvc://outputs/real"},
        "resources": {"gpus": 0, "cpu": "2", "memory": "4Gi"},
    }


@pytest.fixture()
def real_kubelet(cluster, tmp_path: Path, tiny_model_dir: Path):
    k = Kubelet(cluster, tmp_path / "kubelet")  # the pod's own command: the real trainer
    shutil.copytree(tiny_model_dir, k.pvc_root / "models" / "tiny")
    data = k.pvc_root / "data"
    data.mkdir(parents=True)
    shutil.copy(REPO / "examples" / "data" / "instructions.jsonl", data / "train.jsonl")
    shutil.copy(REPO / "examples" / "data" / "preferences.jsonl", data / "pairs.jsonl")
    lines = (REPO / "examples" / "data" / "instructions.jsonl").read_text().splitlines()
    lines[2] = "{not json"
    (data / "broken.jsonl").write_text("\n".join(lines) + "\n")
    k.start()
    yield k
    k.stop()


def _phase(cluster, name: str) -> str | None:
    return ((cluster.ftj(name) or {}).get("status") or {}).get("phase")


def test_real_trainer_succeeds_with_adapter(cluster, real_kubelet) -> None:
    with operator_runner():
        cluster.apply_ftj("real", _spec("train.jsonl"))
        cluster.wait_for(
            lambda: _phase(cluster, "real") in ("Succeeded", "Failed"),
            timeout=240,
            what="finished",
        )
        status = cluster.ftj("real")["status"]
        assert status["phase"] == "Succeeded", (status["conditions"], real_kubelet.logs()[-3000:])
        adapter_uri = status["result"]["adapterUri"]
        assert adapter_uri.startswith("pvc://outputs/real")
        adapter = real_kubelet.pvc_root / adapter_uri.removeprefix("pvc://")
        assert (adapter / "adapter_config.json").exists()
        # the trainer's estimate, made before it loaded the weights, mirrored into the status
        estimate = status["estimate"]
        assert estimate["totalSteps"] == 4
        assert estimate["batchSize"] == 2
        assert estimate["gradientCheckpointing"] is False
        assert 0 < estimate["peakGibPerGpu"] < 4
        assert estimate["worstCaseTokens"] > 0


def test_real_trainer_rejects_malformed_dataset_with_line_numbers(cluster, real_kubelet) -> None:
    with operator_runner():
        cluster.apply_ftj("broken", _spec("broken.jsonl"))
        cluster.wait_for(
            lambda: _phase(cluster, "broken") in ("Succeeded", "Failed"),
            timeout=240,
            what="finished",
        )
        status = cluster.ftj("broken")["status"]
        failed = next(c for c in status["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "InvalidInput", (status, real_kubelet.logs())
        assert "3" in failed["message"]


def test_real_trainer_runs_dpo_and_reports_preference_in_status(cluster, real_kubelet) -> None:
    spec = _spec("pairs.jsonl")
    spec["dataset"].update(format="preference", validation={"splitRatio": 0.1})
    spec["training"].update(objective="dpo", dpo={"beta": 0.2})
    spec["output"]["uri"] = "pvc://outputs/dpo"
    with operator_runner():
        cluster.apply_ftj("dpo", spec)
        cluster.wait_for(
            lambda: _phase(cluster, "dpo") in ("Succeeded", "Failed"),
            timeout=240,
            what="finished",
        )
        status = cluster.ftj("dpo")["status"]
        assert status["phase"] == "Succeeded", (status["conditions"], real_kubelet.logs()[-3000:])
        metrics = status["result"]["metrics"]
        for key in ("preference_accuracy", "preference_margin", "eval_reward_accuracy"):
            assert key in metrics, metrics
        assert "baseline_preference_accuracy" in metrics
        adapter = real_kubelet.pvc_root / status["result"]["adapterUri"].removeprefix("pvc://")
        assert (adapter / "adapter_config.json").exists() and not (adapter / "ref").exists()


def test_real_trainer_reports_to_trackers_and_status_links_them(
    cluster, real_kubelet, mlflow_server: str
) -> None:
    from mlflow import MlflowClient

    spec = {
        **_spec("train.jsonl"),
        "output": {"uri": "pvc://outputs/tracked"},
        "tracking": {
            "mlflow": {"trackingUri": mlflow_server, "experiment": "operator-harness"},
            "wandb": {"project": "operator-harness", "mode": "offline"},
            "tensorboard": True,
        },
    }
    with operator_runner():
        created = cluster.apply_ftj("tracked", spec)
        cluster.wait_for(
            lambda: _phase(cluster, "tracked") in ("Succeeded", "Failed"),
            timeout=240,
            what="finished",
        )
        status = cluster.ftj("tracked")["status"]
    assert status["phase"] == "Succeeded", (status["conditions"], real_kubelet.logs()[-3000:])
    mlflow, wandb, tensorboard = status["tracking"]
    assert status["result"]["tracking"] == status["tracking"]
    assert tensorboard == {"name": "tensorboard", "location": "pvc://outputs/tracked/tensorboard"}
    assert wandb["location"].startswith("pvc://outputs/tracked/wandb/offline-run-")
    tracking = next(c for c in status["conditions"] if c["type"] == "Tracking")
    assert (tracking["status"], tracking["reason"]) == ("True", "Reporting")
    events = real_kubelet.pvc_root / "outputs" / "tracked" / "tensorboard"
    assert any(events.glob("events.out.tfevents.*"))
    # the MLflow run carries the FineTuneJob's identity
    client = MlflowClient(mlflow_server)
    run = client.get_run(mlflow["url"].rsplit("/", 1)[-1])
    meta = created["metadata"]
    assert run.info.status == "FINISHED"
    assert {
        "finetune.dev/name": "tracked",
        "finetune.dev/namespace": meta["namespace"],
        "finetune.dev/uid": meta["uid"],
        "finetune.dev/weights-uri": "pvc://outputs/tracked/adapter",
    }.items() <= run.data.tags.items()
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
