"""Experiment trackers end to end on a tiny real run: a real MLflow tracking server on loopback,
Weights & Biases in offline mode (its run file read back), TensorBoard event files read with
TensorBoard's own reader; and a tracker server that goes away mid-run."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer.config import RunConfig, TrackingSpec
from finetune_trainer.errors import InvalidInputError
from finetune_trainer.experiments import preflight
from finetune_trainer.progress import Outcome, Progress
from finetune_trainer.reporting import run_reported
from finetune_trainer.runner import RunContext

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data" / "instructions.jsonl"


def _config(model_dir: Path, out: Path, tracking: dict[str, Any]) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {"source": str(model_dir)},
            "dataset": {
                "source": str(DATA),
                "format": "alpaca",
                "maxSeqLength": 256,
                "validation": {"splitRatio": 0.1},
            },
            "method": {"type": "lora"},
            "training": {
                "maxSteps": 4,
                "batchSize": 4,
                "learningRate": 0.01,
                "saveSteps": 2,
                "loggingSteps": 1,
            },
            "output": {"uri": str(out)},
            "tracking": tracking,
        }
    )


@pytest.fixture(scope="module")
def tracked(
    mlflow_server: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Any, Path]:
    """One tiny run reporting to all three trackers at once: (summary, output dir)."""
    out = tmp_path_factory.mktemp("tracked") / "out"
    run = _config(
        tiny_model_dir,
        out,
        {
            "runName": "tiny-lora",
            "mlflow": {
                "trackingUri": mlflow_server,
                "experiment": "trackers-test",
                "tags": {"team": "nlp"},
            },
            "wandb": {"project": "trackers-test", "mode": "offline", "tags": ["tiny"]},
            "tensorboard": True,
        },
    )
    env = {"FINETUNE_JOB_NAMESPACE": "team-a", "FINETUNE_JOB_UID": "0b8f-uid"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        summary = run_reported(run, RunContext(name="tiny"), progress_port=None)
    assert summary.outcome == Outcome.SUCCEEDED, summary.message
    return summary, out


def _history(out: Path, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def _assert_same_curve(curve: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    """The same steps, and values equal to float precision."""
    assert [step for step, _ in curve] == [step for step, _ in expected]
    assert [value for _, value in curve] == pytest.approx([value for _, value in expected])


def test_mlflow_server_holds_params_metric_history_final_metrics_and_tags(
    tracked: tuple[Any, Path], mlflow_server: str
) -> None:
    from mlflow import MlflowClient

    summary, out = tracked
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("trackers-test")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    info, data = run.info, run.data
    assert (info.run_name, info.status) == ("tiny-lora", "FINISHED")
    (link,) = [t for t in summary.trackers if t.name == "mlflow"]
    assert (
        link.url == f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs/{info.run_id}"
    )
    assert link.error is None
    # the job's identity and the spec's tags
    assert {
        "finetune.dev/name": "tiny",
        "finetune.dev/namespace": "team-a",
        "finetune.dev/uid": "0b8f-uid",
        "team": "nlp",
        "finetune.dev/weights-uri": f"{out}/adapter",
    }.items() <= data.tags.items()
    # resolved hyperparameters (the spec says learningRate 0.01, epochs auto)
    assert data.params["finetune.learningRate"] == "0.01"
    assert data.params["finetune.batchSize"] == "4"
    assert data.params["finetune.epochs"] == "3.0"  # auto, resolved
    assert data.params["finetune.lora.r"] == "16"
    # the metric history is step-aligned with history.jsonl
    loss = [(m.step, m.value) for m in client.get_metric_history(info.run_id, "loss")]
    _assert_same_curve(loss, _history(out, "loss"))
    assert [s for s, _ in loss] == [1, 2, 3, 4]
    # final metrics: baseline vs tuned, as in metrics.json
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("baseline_eval_loss", "eval_loss", "eval_perplexity", "train_loss"):
        assert data.metrics[key] == pytest.approx(metrics[key])
    baseline = client.get_metric_history(info.run_id, "eval_loss")[0]
    assert (baseline.step, baseline.value) == (0, pytest.approx(metrics["baseline_eval_loss"]))
    # the dataset report, as an artifact on the server
    local = client.download_artifacts(info.run_id, "dataset_report.json", str(out.parent))
    report = json.loads(Path(local).read_text())
    assert report["splits"]["train"]["examples"] > 0 and "droppedDuplicates" in report


WANDB_BLOCK = 32 * 1024


def _wandb_records(path: Path) -> Iterator[Any]:
    """The records of a W&B run file (.wandb: a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_holds_history_and_config(tracked: tuple[Any, Path]) -> None:
    summary, out = tracked
    (link,) = [t for t in summary.trackers if t.name == "wandb"]
    assert link.url is None and link.location is not None and link.error is None
    run_dir = Path(link.location)
    assert run_dir.parent == out / "wandb" and run_dir.name.startswith("offline-run-")
    (run_file,) = run_dir.glob("run-*.wandb")
    records = list(_wandb_records(run_file))
    (opened,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (opened.project, opened.display_name) == ("trackers-test", "tiny-lora")
    assert list(opened.tags) == ["tiny", "team-a/tiny"]
    config = {u.key: json.loads(u.value_json) for u in opened.config.update}
    assert config["finetune"]["learningRate"] == 0.01
    assert config["finetune.dev/uid"] == "0b8f-uid"
    assert config["dataset"]["splits"]["train"]["examples"] > 0
    history = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            if "train/loss" in items:
                history.append((items["train/global_step"], items["train/loss"]))
    _assert_same_curve(history, _history(out, "loss"))
    final: dict[str, Any] = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            final.update({u.key: json.loads(u.value_json) for u in record.summary.update if u.key})
    metrics = json.loads((out / "metrics.json").read_text())
    assert final["baseline_eval_loss"] == pytest.approx(metrics["baseline_eval_loss"])
    assert final["eval_perplexity"] == pytest.approx(metrics["eval_perplexity"])


def test_tensorboard_events_hold_the_loss_curve(tracked: tuple[Any, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary, out = tracked
    (link,) = [t for t in summary.trackers if t.name == "tensorboard"]
    assert link.location == f"{out}/tensorboard"
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    _assert_same_curve(loss, _history(out, "loss"))
    metrics = json.loads((out / "metrics.json").read_text())
    (baseline,) = events.Scalars("final/baseline_eval_loss")
    assert (baseline.step, baseline.value) == (4, pytest.approx(metrics["baseline_eval_loss"]))
    assert "finetune/hyperparameters/text_summary" in events.Tags()["tensors"]


class _Proxy:
    """A TCP forwarder on loopback in front of a server; `close()` makes the server vanish
    for its clients (open connections reset, new ones refused)."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def test_tracking_server_gone_mid_run_does_not_fail_the_run(
    mlflow_server: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = _Proxy(mlflow_server)
    out = tmp_path / "out"
    run = _config(
        tiny_model_dir,
        out,
        {"mlflow": {"trackingUri": proxy.url, "experiment": "goes-away"}, "tensorboard": True},
    )
    ctx = RunContext(name="goes-away")
    seen: list[Progress] = []

    def watch(progress: Progress) -> None:
        seen.append(progress)
        if progress.step >= 2 and not proxy.closed.is_set():
            proxy.close()

    ctx.tracker.subscribe(watch)
    summary = run_reported(run, ctx, progress_port=None)
    assert summary.outcome == Outcome.SUCCEEDED, summary.message
    assert summary.steps == 4
    mlflow, tensorboard = summary.trackers
    assert mlflow.name == "mlflow" and mlflow.url is not None and mlflow.error
    assert tensorboard.error is None  # the other trackers go on
    # the live progress said so too, while the run went on
    assert any(p.trackers and p.trackers[0].error and p.phase != "succeeded" for p in seen)
    # what reached the server before it went away is there
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    run_id = mlflow.url.rsplit("/", 1)[-1]
    assert client.get_run(run_id).data.params["finetune.learningRate"] == "0.01"


def test_wandb_online_without_an_api_key_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    spec = TrackingSpec.model_validate({"wandb": {"project": "p"}})
    with pytest.raises(InvalidInputError, match=r"tracking\.wandb: no API key"):
        preflight(spec)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    preflight(spec)
    preflight(TrackingSpec.model_validate({"wandb": {"project": "p", "mode": "offline"}}))


def test_an_mlflow_run_unknown_to_the_server_is_started_anew(
    mlflow_server: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """tracking.json names the run of an earlier attempt; another server does not have it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "tracking.json").write_text(json.dumps({"mlflow": "0" * 32}))
    run = _config(
        tiny_model_dir, out, {"mlflow": {"trackingUri": mlflow_server, "experiment": "anew"}}
    )
    summary = run_reported(run, RunContext(name="anew"), progress_port=None)
    assert summary.outcome == Outcome.SUCCEEDED, summary.message
    (mlflow,) = summary.trackers or []
    assert mlflow.error is None and mlflow.url is not None
    run_id = json.loads((out / "tracking.json").read_text())["mlflow"]
    assert run_id != "0" * 32 and mlflow.url.endswith(f"/runs/{run_id}")


def test_a_preempted_run_is_killed_in_mlflow_and_its_resume_finishes_the_same_run(
    mlflow_server: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    out = tmp_path / "out"
    run = _config(
        tiny_model_dir, out, {"mlflow": {"trackingUri": mlflow_server, "experiment": "preempt"}}
    )
    ctx = RunContext(name="preempt")

    def stop_at_step_2(progress: Progress) -> None:
        if progress.step >= 2:
            ctx.preemption.event.set()  # what SIGTERM does

    ctx.tracker.subscribe(stop_at_step_2)
    stopped = run_reported(run, ctx, progress_port=None)
    assert stopped.outcome == Outcome.PREEMPTED, stopped.message
    client = MlflowClient(mlflow_server)
    run_id = json.loads((out / "tracking.json").read_text())["mlflow"]
    assert client.get_run(run_id).info.status == "KILLED"
    resumed = run_reported(run, RunContext(name="preempt"), progress_port=None)
    assert resumed.outcome == Outcome.SUCCEEDED, resumed.message
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]
