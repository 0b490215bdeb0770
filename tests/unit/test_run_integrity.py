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


def _reviews(path: Path) -> Path:
    good = ["a wonderful, moving film", "great acting and a clever plot", "loved every minute"]
    bad = ["a dull, lifeless mess", "terrible script and wooden acting", "boring from start to end"]
    rows = [{"text": f"{t} ({i})", "label": "fresh"} for i in range(10) for t in good]
    rows += [{"text": f"{t} ({i})", "label": "rotten"} for i in range(10) for t in bad]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _classifier(model_dir: Path, data: Path, out: Path, **training: Any) -> dict[str, Any]:
    return {
        "model": {"source": str(model_dir)},
        "task": "sequence-classification",
        "dataset": {
            "source": str(data),
            "format": "classification",
            "maxSeqLength": 64,
            "validation": {"splitRatio": 0.2},
            "test": {"splitRatio": 0.2},
        },
        "method": {"type": "lora", "lora": {"r": 8, "targetModules": ["query", "value"]}},
        "training": {"maxSteps": 2, "batchSize": 8, "learningRate": 0.005, **training},
        "output": {"uri": str(out)},
    }


def _weights(directory: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(directory / "adapter_model.safetensors")


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_the_same_seed_gives_the_same_weights(
    tiny_model_dir: Path, minilm_dir: Path, tmp_path: Path
) -> None:
    """The seed reaches the adapter's and the new classification head's initialisation."""
    lora = [
        _doc(tiny_model_dir, tmp_path / f"lm{i}", maxSteps=2, seed=s)
        for i, s in enumerate((42, 42, 7))
    ]
    for doc in lora:
        assert _execute(doc)[0].outcome == Outcome.SUCCEEDED
    first, again, other = (_weights(tmp_path / f"lm{i}" / "adapter") for i in range(3))
    assert _same(first, again)
    assert not _same(first, other)

    data = _reviews(tmp_path / "reviews.jsonl")
    for name in ("cls0", "cls1"):
        summary, _ = _execute(_classifier(minilm_dir, data, tmp_path / name))
        assert summary.outcome == Outcome.SUCCEEDED, summary.message
    a, b = (_weights(tmp_path / name / "adapter") for name in ("cls0", "cls1"))
    assert any("classifier" in k for k in a)  # the new head is saved with the adapter
    assert _same(a, b)


def test_a_classifier_reports_accuracy_and_keeps_the_most_accurate_checkpoint(
    minilm_dir: Path, tmp_path: Path
) -> None:
    import logging

    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    transformers_log = logging.getLogger("transformers")
    transformers_log.addHandler(handler)
    out = tmp_path / "out"
    doc = _classifier(
        minilm_dir,
        _reviews(tmp_path / "reviews.jsonl"),
        out,
        maxSteps=8,
        evalSteps=2,
        saveSteps=2,
        saveTotalLimit=1,
        earlyStopping={"patience": 10, "metric": "eval_accuracy"},
    )
    try:
        summary, seen = _execute(doc)
    finally:
        transformers_log.removeHandler(handler)
    assert summary.outcome == Outcome.SUCCEEDED, summary.message
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("baseline_eval_accuracy", "eval_accuracy", "test_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    assert summary.metrics["baseline_eval_accuracy"] == metrics["baseline_eval_accuracy"]
    assert not [k for k in metrics if "perplexity" in k or "preparation_time" in k]
    assert "epoch" not in metrics and metrics["epochs"] > 0
    assert not [w for w in warnings if "early stopping" in w.lower()]
    # every evaluation's accuracy is recorded; the best checkpoint is the most accurate
    history = {r["step"]: r["eval_accuracy"] for r in _rows(out) if "eval_accuracy" in r}
    checkpoints = seen[-1].checkpoints
    assert all(c.eval_accuracy == history[c.step] for c in checkpoints)
    best = [c for c in checkpoints if c.best]
    evaluated = {s: a for s, a in history.items() if s > 0}
    top = max(evaluated.values())
    assert len(best) == 1 and best[0].step == min(s for s, a in evaluated.items() if a == top)
