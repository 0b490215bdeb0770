"""Distributed training on CPU (gloo), through the real entrypoint (`python -m finetune_trainer`)
and launcher, on the tiny Llama: DDP equals one process, FSDP saves and resumes its shards, a
SIGTERM to one pod checkpoints the whole group, a dead worker stops the others at once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer.progress import ExitCode, Outcome, Summary

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data" / "instructions.jsonl"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(model_dir: Path, out: Path, **training: Any) -> dict[str, Any]:
    method = training.pop("method", {"type": "lora"})
    return {
        "model": {"source": str(model_dir)},
        "dataset": {
            "source": str(DATA),
            "format": "alpaca",
            "maxSeqLength": 256,
            "paddingFree": False,
            "validation": {"splitRatio": 0.1},
        },
        "method": method,
        "training": {
            "maxSteps": 6,
            "batchSize": 4,
            "saveSteps": 3,
            "loggingSteps": 1,
            "learningRate": 0.001,
            "scheduler": "constant",
            "warmupRatio": 0,
            **training,
        },
        "output": {"uri": str(out)},
    }


@dataclass
class Pod:
    """One pod's launcher (or a lone trainer) as a subprocess."""

    proc: subprocess.Popen[bytes]
    termination: Path
    progress_port: int
    log: Path

    def summary(self) -> Summary:
        found = Summary.from_termination_message(self.termination.read_text())
        assert found is not None, self.log.read_text()[-3000:]
        return found

    def wait(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout)

    def progress(self) -> dict[str, Any] | None:
        url = f"http://127.0.0.1:{self.progress_port}/progress"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return dict(json.loads(response.read()))
        except OSError:
            return None


def _start(tmp: Path, config: dict[str, Any], name: str, env: dict[str, str] | None = None) -> Pod:
    """Start `python -m finetune_trainer` as a pod would: config file, progress port,
    termination-message file; `env` adds the group's PET_* variables."""
    work = tmp / name
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(config))
    port = _free_port()
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PET_", "FINETUNE_"))},
        "FINETUNE_CONFIG": str(work / "config.json"),
        "FINETUNE_PROGRESS_PORT": str(port),
        "FINETUNE_TERMINATION_MESSAGE_PATH": str(work / "termination-log"),
        "FINETUNE_JOB_NAME": name,
        **(env or {}),
    }
    log = work / "log.txt"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "finetune_trainer"],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Pod(proc, work / "termination-log", port, log)


def _group(nnodes: int, nproc: int, master_port: int, node: int) -> dict[str, str]:
    return {
        "PET_NNODES": str(nnodes),
        "PET_NPROC_PER_NODE": str(nproc),
        "PET_NODE_RANK": str(node),
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": str(master_port),
    }


def _run(tmp: Path, config: dict[str, Any], name: str, nproc: int = 1) -> Summary:
    env = _group(1, nproc, _free_port(), 0) if nproc > 1 else None
    pod = _start(tmp, config, name, env)
    code = pod.wait()
    summary = pod.summary()
    assert code == int(summary.exit_code()), pod.log.read_text()[-3000:]
    return summary


def _history(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def _training_steps(out: Path) -> list[int]:
    return [row["step"] for row in _history(out) if "loss" in row]


def _wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_ddp_on_two_workers_trains_as_one_process_with_the_same_global_batch(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    one = _run(tmp_path, _config(tiny_model_dir, tmp_path / "one", batchSize=8), "one")
    two = _run(tmp_path, _config(tiny_model_dir, tmp_path / "two", batchSize=4), "two", nproc=2)
    assert one.outcome == two.outcome == Outcome.SUCCEEDED, (one, two)
    assert one.steps == two.steps == 6
    assert two.trained_tokens == one.trained_tokens  # counted over every rank
    assert two.metrics["train_loss"] == pytest.approx(one.metrics["train_loss"], rel=1e-3)
    assert two.metrics["eval_loss"] == pytest.approx(one.metrics["eval_loss"], rel=1e-3)
    # rank 0 alone wrote the outputs: one history row per step, one marker per checkpoint
    out = tmp_path / "two"
    assert _training_steps(out) == [1, 2, 3, 4, 5, 6]
    assert [c.name for c in sorted((out / "checkpoints").glob("checkpoint-*"))] == [
        "checkpoint-3",
        "checkpoint-6",
    ]
    marker = json.loads(
        (out / "checkpoints" / "checkpoint-6" / ".finetune-complete.json").read_text()
    )
    assert marker["worldSize"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6


def test_ddp_token_budget_batches_go_whole_to_each_worker(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """training.batchTokens under DDP: each worker trains whole budget groups in turn, so an
    epoch takes half the groups' steps and every training token is trained (accelerate pads
    the last round with groups from the start)."""
    from finetune_trainer.config import RunConfig
    from finetune_trainer.models import LocalModel
    from finetune_trainer.runner import prepare_data
    from finetune_trainer.token_batches import example_lengths, token_groups

    config = _config(tiny_model_dir, tmp_path / "two", batchTokens=600, epochs=1)
    del config["training"]["maxSteps"], config["training"]["batchSize"]
    config["dataset"]["paddingFree"] = "auto"
    run = RunConfig.model_validate(config)
    _, prepared = prepare_data(run, LocalModel(tiny_model_dir))
    lengths = example_lengths(prepared.train)
    groups = token_groups(lengths, 600, run.training.seed)
    two = _run(tmp_path, config, "two", nproc=2)
    assert two.outcome == Outcome.SUCCEEDED, two
    assert two.steps == -(-len(groups) // 2)
    assert sum(lengths) <= two.trained_tokens <= sum(lengths) + 600  # + at most one group


def _weights(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return dict(load_file(str(path / "model.safetensors")))


def test_fsdp_full_fine_tune_saves_the_trained_weights_and_resumes_from_its_shards(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    fsdp = {"distributed": {"strategy": "fsdp"}, "method": {"type": "full"}, "saveSteps": 2}
    whole = _run(
        tmp_path, _config(tiny_model_dir, tmp_path / "whole", maxSteps=4, **fsdp), "w", nproc=2
    )
    assert whole.outcome == Outcome.SUCCEEDED and whole.steps == 4, whole
    model_dir = tmp_path / "whole" / "model"
    AutoModelForCausalLM.from_pretrained(model_dir)  # loads as a plain model
    saved = _weights(model_dir)
    # the checkpoint of the last step is sharded: one file per rank; consolidated, it holds
    # exactly the weights saved in model/
    shards = tmp_path / "whole" / "checkpoints" / "checkpoint-4" / "pytorch_model_fsdp_0"
    assert len(list(shards.glob("*.distcp"))) == 2
    dcp_to_torch_save(str(shards), str(tmp_path / "consolidated.pt"))
    consolidated = torch.load(tmp_path / "consolidated.pt", weights_only=True)
    consolidated = consolidated.get("model", consolidated)
    for name, tensor in saved.items():
        key = next(k for k in consolidated if k.endswith(name))
        assert torch.equal(consolidated[key].to(tensor.dtype), tensor), name

    # the same run in two parts: 2 steps, then resumed from the sharded checkpoint-2 to step 4
    parts = tmp_path / "parts"
    first = _run(tmp_path, _config(tiny_model_dir, parts, maxSteps=2, **fsdp), "p1", nproc=2)
    assert first.steps == 2, first
    second = _run(tmp_path, _config(tiny_model_dir, parts, maxSteps=4, **fsdp), "p2", nproc=2)
    assert second.outcome == Outcome.SUCCEEDED and second.steps == 4, second
    assert "resumed from checkpoint-2" in (second.message or "")
    resumed = _weights(parts / "model")
    for name, tensor in saved.items():
        assert torch.allclose(resumed[name], tensor, atol=1e-6), name
    assert _training_steps(parts) == [1, 2, 3, 4]
    assert whole.metrics["baseline_eval_loss"] == second.metrics["baseline_eval_loss"]


def test_sigterm_to_one_pod_checkpoints_every_rank_and_the_rerun_resumes(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = _config(tiny_model_dir, tmp_path / "out", maxSteps=40, saveSteps=1000)
    port = _free_port()
    pods = [_start(tmp_path, config, f"n{i}", _group(2, 1, port, i)) for i in range(2)]
    _wait_for(lambda: ((pods[0].progress() or {}).get("step") or 0) >= 3, 240, "step 3")
    pods[1].proc.send_signal(signal.SIGTERM)  # pod 1 is preempted
    codes = [pod.wait(300) for pod in pods]
    assert codes == [int(ExitCode.PREEMPTED)] * 2, [p.log.read_text()[-2000:] for p in pods]
    stopped = pods[0].summary()
    assert stopped.outcome == Outcome.PREEMPTED and stopped.last_checkpoint is not None
    step = stopped.last_checkpoint.step
    assert 3 <= step < 40 and f"checkpoint-{step} is complete" in (stopped.message or "")

    port = _free_port()
    pods = [_start(tmp_path, config, f"r{i}", _group(2, 1, port, i)) for i in range(2)]
    assert [pod.wait(300) for pod in pods] == [0, 0]
    done = pods[0].summary()
    assert done.steps == 40 and f"resumed from checkpoint-{step}" in (done.message or "")
    assert _training_steps(tmp_path / "out") == list(range(1, 41))


def _worker_pid(launcher: int, rank: int) -> int:
    """The pid of the launcher's worker of global `rank` (from its environment)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} under {launcher}")


def test_a_killed_worker_stops_the_group_within_seconds_and_the_rerun_resumes(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = _config(tiny_model_dir, tmp_path / "out", maxSteps=40, saveSteps=4)
    marker = tmp_path / "out" / "checkpoints" / "checkpoint-4" / ".finetune-complete.json"
    port = _free_port()
    pods = [_start(tmp_path, config, f"n{i}", _group(2, 1, port, i)) for i in range(2)]
    _wait_for(marker.exists, 240, "checkpoint-4")
    os.kill(_worker_pid(pods[1].proc.pid, 1), signal.SIGKILL)
    killed = time.monotonic()
    codes = [pod.wait(120) for pod in pods]
    stopped_after = time.monotonic() - killed
    assert codes == [int(ExitCode.FAILED)] * 2
    assert stopped_after < 60, f"the group took {stopped_after:.1f} s to stop"
    print(f"surviving ranks stopped {stopped_after:.1f} s after the SIGKILL")
    assert pods[1].summary().message == "rank 1: killed by SIGKILL (out of memory?)"
    lost = pods[0].summary()
    assert lost.reason == "PeerLost" and (lost.message or "").startswith(
        "rank 0: lost another rank"
    )

    port = _free_port()
    pods = [_start(tmp_path, config, f"r{i}", _group(2, 1, port, i)) for i in range(2)]
    assert [pod.wait(300) for pod in pods] == [0, 0], pods[0].log.read_text()[-3000:]
    done = pods[0].summary()
    assert done.steps == 40 and "resumed from checkpoint-" in (done.message or "")
    assert _training_steps(tmp_path / "out") == list(range(1, 41))
