"""Trainer callbacks: live progress and history, complete-checkpoint markers, preemption."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from finetune_trainer.checkpoints import CheckpointStore
from finetune_trainer.progress import Phase
from finetune_trainer.tracker import ProgressTracker

log = logging.getLogger(__name__)


class PreemptionFlag:
    """Set by SIGTERM (the kubelet's notice before a preemption or eviction)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def install(self) -> None:
        """Handle SIGTERM (and SIGINT) by asking the training loop to save and stop."""

        def handler(signum: int, frame: FrameType | None) -> None:
            if not self.event.is_set():
                log.warning("received signal %d: saving a checkpoint and stopping", signum)
            self.event.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    @property
    def is_set(self) -> bool:
        """Whether a stop was requested."""
        return self.event.is_set()


class RunCallback(TrainerCallback):  # type: ignore[misc]
    """Mirrors the Trainer's state into the tracker and history, marks checkpoints complete,
    and turns a preemption notice into "save now, then stop"."""

    def __init__(
        self,
        tracker: ProgressTracker,
        store: CheckpointStore,
        history_path: Path,
        preemption: PreemptionFlag,
    ) -> None:
        self.tracker = tracker
        self.store = store
        self.history_path = history_path
        self.preemption = preemption
        self._start_time = 0.0
        self._start_step = 0
        self._start_tokens = 0

    # -- helpers ------------------------------------------------------------------------------
    def _rate_and_eta(self, state: TrainerState) -> tuple[float | None, float | None]:
        """Tokens/s and seconds left, from the steps of this attempt (not resumed ones)."""
        elapsed = time.monotonic() - self._start_time
        steps = state.global_step - self._start_step
        if steps <= 0 or elapsed <= 0:
            return None, None
        tokens = state.num_input_tokens_seen - self._start_tokens
        tps = tokens / elapsed if tokens > 0 else None
        eta = (state.max_steps - state.global_step) * elapsed / steps
        return tps, max(eta, 0.0)

    # -- events -------------------------------------------------------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        self._start_time = time.monotonic()
        self._start_step = state.global_step
        self._start_tokens = state.num_input_tokens_seen
        self.tracker.update(
            phase=Phase.TRAINING,
            message="resumed" if state.global_step else None,
            step=state.global_step,
            total_steps=state.max_steps,
            checkpoints=self.store.complete(),
        )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        tps, eta = self._rate_and_eta(state)
        self.tracker.update(
            step=state.global_step,
            epoch=round(state.epoch or 0.0, 4),
            percent=round(100.0 * state.global_step / max(state.max_steps, 1), 2),
            tokens_per_second=round(tps, 1) if tps else None,
            eta_seconds=round(eta, 1) if eta is not None else None,
            trained_tokens=state.num_input_tokens_seen or None,
        )
        if self.preemption.is_set:
            control.should_save = True
            control.should_training_stop = True

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **_: Any,
    ) -> None:
        if not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        with self.history_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        update: dict[str, Any] = {}
        if "loss" in logs:
            update["loss"] = round(float(logs["loss"]), 5)
        if "learning_rate" in logs:
            update["learning_rate"] = float(logs["learning_rate"])
        if "eval_loss" in logs:
            update["eval_loss"] = round(float(logs["eval_loss"]), 5)
        if update:
            self.tracker.update(**update)
            log.info(
                "step %d/%d %s",
                state.global_step,
                state.max_steps,
                " ".join(f"{k}={v:.4g}" for k, v in logs.items() if isinstance(v, float)),
            )

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        self.tracker.phase(Phase.SAVING, f"checkpoint {state.global_step}")
        eval_loss = CheckpointStore.trainer_eval_loss(state.log_history, state.global_step)
        self.store.mark_complete(state.global_step, eval_loss)
        self.tracker.update(
            phase=Phase.PREEMPTED if self.preemption.is_set else Phase.TRAINING,
            message=None,
            checkpoints=self.store.complete(),
        )
