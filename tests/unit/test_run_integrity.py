"""Run integrity end to end on the tiny model: a run resumes only its own output, one run
writes an output at a time, history.jsonl holds each step once across kills and resumes, a
stop before training says what happened, and a resume says where it resumed from."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer.config import RunConfig
from finetune_trainer.progress import ExitCode, Outcome, Phase, Progress
from finetune_trainer.reporting import exit_code, run_reported
from finetune_trainer.runner import RunContext

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data" / "instructions.jsonl"


def _doc(model_dir: Path, out: Path, data: Path = DATA, **training: Any) -> dict[str, Any]:
    return {
        "model": {"source": str(model_dir)},
        "dataset": {
            "source": str(data),
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
            **training,
        },
        "output": {"uri": str(out)},
    }


def _execute(doc: dict[str, Any], on_progress: Any = None) -> tuple[Any, list[Progress]]:
    ctx = RunContext(name="t")
    seen: list[Progress] = []
    ctx.tracker.subscribe(seen.append)
    if on_progress is not None:
        ctx.tracker.subscribe(lambda p: on_progress(p, ctx))
    return run_reported(RunConfig.model_validate(doc), ctx, progress_port=None), seen


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def _files(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and ".cache" not in p.parts
    }


def test_a_changed_spec_is_refused_and_the_same_run_republished(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first, _ = _execute(_doc(tiny_model_dir, out))
    assert first.outcome == Outcome.SUCCEEDED, first.message
    assert json.loads((out / "fingerprint.json").read_text())["digest"]
    finished = _files(out)

    # another learning rate: refused before any model is loaded, the output untouched
    refused, seen = _execute(_doc(tiny_model_dir, out, learningRate=0.02))
    assert refused.outcome == Outcome.INVALID_INPUT
    assert exit_code(refused) == ExitCode.INVALID_INPUT
    message = refused.message or ""
    assert "\n" not in message
    assert f"output.uri: {out} holds a different run" in message
    assert "training.learningRate 0.01 -> 0.02" in message
    assert "choose another output.uri" in message and f"delete {out} to start over" in message
    assert Phase.LOADING_MODEL not in [p.phase for p in seen]
    assert _files(out) == finished

    # the same path with other content: the data is part of the run, not its path
    data = tmp_path / "data.jsonl"
    shutil.copy(DATA, data)
    moved, _ = _execute(_doc(tiny_model_dir, out, data=data, loggingSteps=2))
    assert moved.outcome == Outcome.SUCCEEDED, moved.message  # same content elsewhere: resumes
    assert moved.message == "resumed from checkpoint-4" and moved.steps == 4
    rows = data.read_text().splitlines()
    data.write_text("\n".join(rows[1:]) + "\n")
    changed, _ = _execute(_doc(tiny_model_dir, out, data=data))
    assert changed.outcome == Outcome.INVALID_INPUT
    assert "the training examples differ" in (changed.message or "")


def test_a_second_run_on_an_output_in_use_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = tmp_path / "config.json"
    config.write_text(json.dumps(_doc(tiny_model_dir, out, maxSteps=10_000, saveSteps=1000)))
    env = {**os.environ, "FINETUNE_CONFIG": str(config), "FINETUNE_PROGRESS_PORT": "0"}
    env["FINETUNE_TERMINATION_MESSAGE_PATH"] = str(tmp_path / "termination-log")
    first = subprocess.Popen(
        [sys.executable, "-m", "finetune_trainer"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not (out / "history.jsonl").exists():  # the first run is training
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        started = time.monotonic()
        second, _ = _execute(_doc(tiny_model_dir, out, maxSteps=10_000, saveSteps=1000))
        assert time.monotonic() - started < 30
        assert second.outcome == Outcome.INVALID_INPUT
        assert f"is in use by another run (pid {first.pid} on host" in (second.message or "")
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()


def test_sigkill_mid_run_then_resume_logs_each_step_once(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    doc = _doc(tiny_model_dir, out, maxSteps=24, batchSize=2, saveSteps=4, evalSteps=4)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(doc))
    env = {**os.environ, "FINETUNE_CONFIG": str(config), "FINETUNE_PROGRESS_PORT": "0"}
    env["FINETUNE_TERMINATION_MESSAGE_PATH"] = str(tmp_path / "termination-log")
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune_trainer"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def complete() -> list[int]:
        markers = (out / "checkpoints").glob("checkpoint-*/.finetune-complete.json")
        return sorted(int(m.parent.name.split("-")[1]) for m in markers)

    try:
        deadline = time.monotonic() + 600
        while True:  # kill it between two checkpoints, with steps logged after the last one
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            history = out / "history.jsonl"
            steps = [r["step"] for r in _rows(out) if "loss" in r] if history.exists() else []
            saved = complete()
            if saved and steps and saved[-1] + 1 <= steps[-1] < 24 and steps[-1] % 4 != 0:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    logged = [r["step"] for r in _rows(out) if "loss" in r]
    resumed = f"checkpoint-{complete()[-1]}"
    assert logged[-1] > complete()[-1]  # the killed attempt logged steps the resume redoes

    summary, seen = _execute(doc)
    assert summary.outcome == Outcome.SUCCEEDED, summary.message
    assert summary.message == f"resumed from {resumed}"
    assert any(p.message == f"resuming from {resumed}" for p in seen)
    rows = _rows(out)
    losses = [r for r in rows if "loss" in r]
    assert [r["step"] for r in losses] == list(range(1, 25))  # one row per optimizer step
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 4, 8, 12, 16, 20, 24]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_loss"] == pytest.approx(sum(r["loss"] for r in losses) / 24)


def test_a_stop_before_training_says_what_happened_and_a_resume_where_from(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"

    def stop_at_baseline(p: Progress, ctx: RunContext) -> None:
        if p.phase == Phase.EVALUATING and (p.message or "").startswith("baseline"):
            ctx.preemption.event.set()  # as SIGTERM or Ctrl-C would

    stopped, _ = _execute(_doc(tiny_model_dir, out), stop_at_baseline)
    assert stopped.outcome == Outcome.PREEMPTED and exit_code(stopped) == ExitCode.PREEMPTED
    assert stopped.message == (
        "stopped while evaluating (baseline: the untuned model on the validation split): "
        "nothing lost; no checkpoint yet; running again starts from scratch"
    )
    assert stopped.last_checkpoint is None
    assert not list(out.glob("checkpoints/checkpoint-*")) and not (out / "history.jsonl").exists()

    first, _ = _execute(_doc(tiny_model_dir, out, maxSteps=2))
    assert first.outcome == Outcome.SUCCEEDED and first.message is None  # started from scratch
    stopped, _ = _execute(_doc(tiny_model_dir, out), stop_at_baseline)
    assert stopped.outcome == Outcome.PREEMPTED
    assert stopped.message is not None
    assert stopped.message.endswith("nothing lost; running again resumes from checkpoint-2")

    resumed, seen = _execute(_doc(tiny_model_dir, out))
    assert resumed.outcome == Outcome.SUCCEEDED and resumed.steps == 4
    assert resumed.message == "resumed from checkpoint-2"
    messages = [(p.phase, p.message) for p in seen]
    assert (Phase.LOADING_MODEL, "resuming from checkpoint-2") in messages
    assert (Phase.TRAINING, "resumed from checkpoint-2") in messages
    assert [r["step"] for r in _rows(out) if "loss" in r] == [1, 2, 3, 4]
