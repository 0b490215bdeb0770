"""The best checkpoint follows the run's metric; history.jsonl holds each step once."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from finetune_trainer.checkpoints import latest_eval, mark_best
from finetune_trainer.history import History
from finetune_trainer.progress import CheckpointInfo
from hypothesis import given
from hypothesis import strategies as st

T0 = datetime(2026, 1, 1, tzinfo=UTC)
scores = st.lists(st.floats(0.0, 10.0) | st.none(), min_size=1, max_size=12)


def _checkpoints(values: list[float | None], metric: str) -> list[CheckpointInfo]:
    return [
        CheckpointInfo(step=2 * (i + 1), uri=f"u/{i}", time=T0, **{metric: v})
        for i, v in enumerate(values)
    ]


@given(values=scores)
def test_best_is_the_lowest_loss_earliest_on_a_tie(values: list[float | None]) -> None:
    marked = mark_best(_checkpoints(values, "eval_loss"), "eval_loss")
    scored = [v for v in values if v is not None]
    best = [c for c in marked if c.best]
    if not scored:
        assert best == []
        return
    assert len(best) == 1 and best[0].eval_loss == min(scored)
    assert best[0].step == min(c.step for c in marked if c.eval_loss == min(scored))


@given(values=scores)
def test_best_is_the_highest_accuracy_earliest_on_a_tie(values: list[float | None]) -> None:
    marked = mark_best(_checkpoints(values, "eval_accuracy"), "eval_accuracy")
    scored = [v for v in values if v is not None]
    best = [c for c in marked if c.best]
    if not scored:
        assert best == []
        return
    assert len(best) == 1 and best[0].eval_accuracy == max(scored)
    assert best[0].step == min(c.step for c in marked if c.eval_accuracy == max(scored))


def test_a_checkpoint_records_the_latest_evaluation_before_it() -> None:
    history = [
        {"loss": 1.0, "step": 1},
        {"eval_loss": 0.9, "eval_accuracy": 0.5, "eval_runtime": 1.0, "step": 2},
        {"loss": 0.8, "step": 3},
        {"eval_loss": 0.7, "eval_accuracy": 0.75, "step": 4},
    ]
    assert latest_eval(history, 3) == {"eval_loss": 0.9, "eval_accuracy": 0.5}
    assert latest_eval(history, 4) == {"eval_loss": 0.7, "eval_accuracy": 0.75}
    assert latest_eval(history, 1) == {}


def test_history_restarts_from_the_resumed_state(tmp_path: Path) -> None:
    """Rows an interrupted attempt logged after its last checkpoint are dropped; the baseline
    (step 0) and the end-of-training record appear once, or not at all."""
    path = tmp_path / "history.jsonl"
    history = History(path)
    history.baseline = {"step": 0, "epoch": 0.0, "eval_loss": 3.0}
    checkpoint_state = [{"loss": 2.0, "step": s, "epoch": s / 10} for s in (1, 2)]
    history.restart(checkpoint_state)
    for step in (3, 4):  # logged by the first attempt after checkpoint-2, then killed
        history.append({"loss": 1.5, "epoch": step / 10}, step, step / 10)
    history.restart(checkpoint_state)  # the second attempt resumes from checkpoint-2
    for step in (3, 4):
        history.append({"loss": 1.0, "epoch": step / 10}, step, step / 10)
    history.append({"train_loss": 1.5, "train_runtime": 9.0, "total_flos": 1.0}, 4, 0.4)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r.get("loss"), r.get("eval_loss")) for r in rows] == [
        (0, None, 3.0),
        (1, 2.0, None),
        (2, 2.0, None),
        (3, 1.0, None),
        (4, 1.0, None),
    ]
