"""`python -m finetune_trainer` as the pod runs it: config from a file, /progress live,
SIGTERM -> checkpoint + exit 75, resume to the same step count, termination message."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from fake_servers import FakeServer
from finetune_trainer.progress import ExitCode, Outcome, Progress, Summary

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data" / "instructions.jsonl"
PAIRS = REPO / "examples" / "data" / "preferences.jsonl"
TOTAL_STEPS = 60


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(model_dir: Path, out: Path, objective: str = "sft") -> dict[str, Any]:
    data = {"source": str(DATA), "format": "alpaca"}
    if objective != "sft":  # preference pairs, format auto-detected
        data = {"source": str(PAIRS)}
    return {
        "model": {"source": str(model_dir)},
        "dataset": {**data, "maxSeqLength": 256},
        "method": {"type": "lora"},
        "training": {
            "objective": objective,
            "maxSteps": TOTAL_STEPS,
            "batchSize": 2,
            "learningRate": 0.005,
            "saveSteps": 20,
            "loggingSteps": 1,
        },
        "output": {"uri": str(out)},
    }


def _start(tmp: Path, config: dict[str, Any]) -> tuple[subprocess.Popen[bytes], int, Path]:
    cfg = tmp / "config.json"
    cfg.write_text(json.dumps(config))
    port = _free_port()
    term = tmp / f"termination-{port}"
    env = {
        **os.environ,
        "FINETUNE_CONFIG": str(cfg),
        "FINETUNE_PROGRESS_PORT": str(port),
        "FINETUNE_TERMINATION_MESSAGE_PATH": str(term),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune_trainer"],
        env=env,
        cwd=tmp,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, port, term


def _progress(port: int) -> Progress | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=2) as resp:
            return Progress.model_validate_json(resp.read())
    except OSError:
        return None


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_sigterm_saves_exits_75_and_the_next_run_resumes(
    objective: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    proc, port, term = _start(tmp_path, _config(tiny_model_dir, out, objective))
    seen: list[Progress] = []
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            progress = _progress(port)
            if progress is not None:
                seen.append(progress)
                if progress.phase == "training" and progress.step >= 5:
                    break
            assert proc.poll() is None, "trainer exited before training"
            time.sleep(0.05)
        else:
            raise AssertionError("no training progress within 600 s")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped_at = seen[-1].step
    assert code == ExitCode.PREEMPTED
    # /progress was live JSON through the phases, with totals once training started
    phases = [p.phase for p in seen]
    assert "validating-data" in phases or "loading-model" in phases
    assert seen[-1].total_steps == TOTAL_STEPS
    summary = Summary.from_termination_message(term.read_text())
    assert summary is not None and summary.outcome == Outcome.PREEMPTED
    assert summary.last_checkpoint is not None
    assert stopped_at <= summary.last_checkpoint.step < TOTAL_STEPS
    marker = out / "checkpoints" / f"checkpoint-{summary.last_checkpoint.step}"
    assert (marker / ".finetune-complete.json").exists()

    proc, _, term = _start(tmp_path, _config(tiny_model_dir, out, objective))
    assert proc.wait(timeout=600) == ExitCode.SUCCEEDED
    final = Summary.from_termination_message(term.read_text())
    assert final is not None and final.outcome == Outcome.SUCCEEDED
    assert final.steps == TOTAL_STEPS
    assert json.loads((out / "metrics.json").read_text())["steps"] == TOTAL_STEPS
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    resumed = summary.last_checkpoint.step
    after = [h["step"] for h in history if "loss" in h and h["step"] > resumed]
    assert after[0] == resumed + 1  # continued from the checkpoint, not from step 0


def test_invalid_config_file_exits_65_with_field_path(tmp_path: Path) -> None:
    proc, _, term = _start(tmp_path, {"model": {"source": "./m"}, "dataset": {}, "output": {}})
    assert proc.wait(timeout=60) == ExitCode.INVALID_INPUT
    summary = Summary.from_termination_message(term.read_text())
    assert summary is not None and summary.outcome == Outcome.INVALID_INPUT
    assert "dataset.source: set exactly one of source or inline" in (summary.message or "")
    assert "output.uri: Field required" in (summary.message or "")


def test_invalid_dataset_exits_65_with_line_numbers(tiny_model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    good = '{"instruction": "Say hi", "input": "", "output": "hi"}'
    bad.write_text(f"{good}\n{good.replace('hi', 'yo')}\n{{not json\n")
    config = _config(tiny_model_dir, tmp_path / "out")
    config["dataset"]["source"] = str(bad)
    proc, _, term = _start(tmp_path, config)
    assert proc.wait(timeout=120) == ExitCode.INVALID_INPUT
    summary = Summary.from_termination_message(term.read_text())
    assert summary is not None and summary.outcome == Outcome.INVALID_INPUT
    assert "bad.jsonl:3" in (summary.message or "")
    assert not (tmp_path / "out" / "adapter").exists()


@pytest.mark.parametrize(
    ("status", "code", "outcome", "reason"),
    [
        (503, ExitCode.FAILED, Outcome.FAILED, "Transient"),
        (404, ExitCode.INVALID_INPUT, Outcome.INVALID_INPUT, "InvalidInput"),
    ],
)
def test_the_pod_exits_retryable_on_a_hub_outage_and_65_on_a_missing_model(
    tmp_path: Path, status: int, code: ExitCode, outcome: Outcome, reason: str
) -> None:
    """The contract's exit codes for the Hub failing: the operator retries an outage, and
    fails at once (podFailurePolicy) for a model that is not there."""
    hub = FakeServer(status)
    config = {**_config(tmp_path, tmp_path / "out"), "model": {"source": "hf://acme/tiny"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    term = tmp_path / "termination-log"
    env = {
        **os.environ,
        "FINETUNE_CONFIG": str(tmp_path / "config.json"),
        "FINETUNE_PROGRESS_PORT": str(_free_port()),
        "FINETUNE_TERMINATION_MESSAGE_PATH": str(term),
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "0",
    }
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "finetune_trainer"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        hub.close()
    assert proc.returncode == int(code), proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    summary = Summary.from_termination_message(term.read_text())
    assert summary is not None and summary.outcome == outcome and summary.reason == reason
    assert summary.message is not None
    assert summary.message.startswith("model.source: hf://acme/tiny: ")
