"""history.jsonl: one row per logged optimizer step and one per evaluation, across resumes.

The rows come from the Trainer's log history. When training starts (or resumes), the file is
rewritten from the state it starts from: the baseline evaluation (step 0), then every row of
the resumed checkpoint's log history. Rows that an interrupted attempt logged after its last
checkpoint are dropped, since the resumed run logs those steps again. During training each new
row is appended as it is logged, so the file can be followed live.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Keys of the Trainer's end-of-training record (a summary of one train() call, not a step).
_SUMMARY_KEYS = ("train_loss", "total_flos")


def row(
    entry: dict[str, Any], step: int | None = None, epoch: float | None = None
) -> dict[str, Any]:
    """A history row: step and epoch first, then the logged values."""
    values = {k: v for k, v in entry.items() if k not in ("step", "epoch")}
    return {
        "step": entry.get("step", step),
        "epoch": entry.get("epoch", epoch),
        **values,
    }


def is_step_record(entry: dict[str, Any]) -> bool:
    """Whether a log entry belongs in the history (not the end-of-training summary)."""
    return not any(key in entry for key in _SUMMARY_KEYS)


class History:
    """The history file of one run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.baseline: dict[str, Any] | None = None

    def restart(self, log_history: Iterable[dict[str, Any]]) -> None:
        """Rewrite the file: the baseline row, then `log_history` (the state training starts
        from: empty, or the resumed checkpoint's)."""
        rows = [self.baseline] if self.baseline is not None else []
        rows += [row(entry) for entry in log_history if is_step_record(entry)]
        tmp = self.path.with_name(f"{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(self.path)

    def append(self, entry: dict[str, Any], step: int, epoch: float | None) -> None:
        """Add one row logged during training."""
        if is_step_record(entry):
            with self.path.open("a") as fh:
                fh.write(json.dumps(row(entry, step, epoch)) + "\n")
