"""Live run state: one `Progress` snapshot, updated by the training loop, read by the
progress server, the local progress bar and the final summary."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from finetune_trainer.progress import Phase, Progress, utcnow

Listener = Callable[[Progress], None]


class ProgressTracker:
    """Thread-safe holder of the current `Progress`; listeners are called on every update."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._progress = Progress()
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        """Call `listener` with a copy of the progress after each update."""
        self._listeners.append(listener)

    def snapshot(self) -> Progress:
        """A copy of the current progress."""
        with self._lock:
            return self._progress.model_copy(deep=True)

    def update(self, **fields: Any) -> None:
        """Set fields of the progress (python names) and notify listeners."""
        with self._lock:
            self._progress = self._progress.model_copy(update={**fields, "updated_at": utcnow()})
            snapshot = self._progress.model_copy(deep=True)
        for listener in self._listeners:
            listener(snapshot)

    def phase(self, phase: Phase, message: str | None = None) -> None:
        """Enter a new phase of the run."""
        self.update(phase=phase, message=message)
