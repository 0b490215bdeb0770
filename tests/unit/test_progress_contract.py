"""The trainer -> operator contract: /progress server, termination message, exit codes."""

from __future__ import annotations

import json
import urllib.request

import pytest
from finetune_trainer.progress import (
    TERMINATION_MESSAGE_MAX_BYTES,
    ExitCode,
    Outcome,
    Phase,
    Progress,
    Summary,
)
from finetune_trainer.reporting import exit_code, write_termination_message
from finetune_trainer.server import ProgressServer
from finetune_trainer.tracker import ProgressTracker


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_progress_server_serves_live_snapshot() -> None:
    tracker = ProgressTracker()
    server = ProgressServer(tracker, 0, host="127.0.0.1").start()
    try:
        tracker.update(phase=Phase.TRAINING, step=3, total_steps=10, loss=1.25)
        status, body = _get(server.port, "/progress")
        assert status == 200
        doc = json.loads(body)
        assert doc["phase"] == "training"
        assert doc["step"] == 3
        assert doc["totalSteps"] == 10
        assert doc["loss"] == 1.25
        assert Progress.model_validate(doc).step == 3
        tracker.update(step=4)
        assert json.loads(_get(server.port, "/progress")[1])["step"] == 4
        assert _get(server.port, "/nope")[0] == 404
    finally:
        server.close()


def test_tracker_notifies_listeners_with_copies() -> None:
    tracker = ProgressTracker()
    seen: list[Progress] = []
    tracker.subscribe(seen.append)
    tracker.phase(Phase.VALIDATING_DATA, "reading")
    tracker.update(step=1)
    assert [p.phase for p in seen] == [Phase.VALIDATING_DATA, Phase.VALIDATING_DATA]
    assert seen[0].step == 0 and seen[1].step == 1


def test_termination_message_fits_4kib_even_with_a_huge_message() -> None:
    summary = Summary(
        outcome=Outcome.INVALID_INPUT,
        reason="InvalidInput",
        message="line 3: bad json\n" * 2000,
        metrics={f"m{i}": float(i) for i in range(20)},
    )
    text = summary.to_termination_message()
    assert len(text.encode()) <= TERMINATION_MESSAGE_MAX_BYTES
    parsed = Summary.from_termination_message(text)
    assert parsed is not None
    assert parsed.outcome == Outcome.INVALID_INPUT
    assert parsed.message and parsed.message.startswith("line 3: bad json")


def test_termination_message_round_trip_and_garbage() -> None:
    summary = Summary(outcome=Outcome.SUCCEEDED, adapter_uri="s3://b/run/adapter", steps=7)
    assert Summary.from_termination_message(summary.to_termination_message()) == summary
    assert Summary.from_termination_message("Traceback (most recent call last): ...") is None
    assert Summary.from_termination_message(None) is None


@pytest.mark.parametrize(
    ("outcome", "code"),
    [
        (Outcome.SUCCEEDED, 0),
        (Outcome.INVALID_INPUT, 65),
        (Outcome.PREEMPTED, 75),
        (Outcome.FAILED, 1),
    ],
)
def test_exit_codes(outcome: Outcome, code: int) -> None:
    assert exit_code(Summary(outcome=outcome)) == ExitCode(code)


def test_write_termination_message_to_env_path(tmp_path, monkeypatch) -> None:
    path = tmp_path / "termination-log"
    monkeypatch.setenv("FINETUNE_TERMINATION_MESSAGE_PATH", str(path))
    write_termination_message(Summary(outcome=Outcome.PREEMPTED, steps=5))
    assert json.loads(path.read_text()) == {"outcome": "Preempted", "metrics": {}, "steps": 5}
