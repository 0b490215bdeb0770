"""Trainer callbacks: live progress and history, complete-checkpoint markers, preemption."""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from finetune_trainer.checkpoints import CheckpointStore, latest_eval
from finetune_trainer.distributed import Rank, agree, barrier
from finetune_trainer.history import History
from finetune_trainer.lock import OutputLock
from finetune_trainer.progress import Phase
from finetune_trainer.tracker import ProgressTracker

log = logging.getLogger(__name__)


class StopRequestedError(Exception):
    """A stop was requested before training started: there is nothing new to save."""


class PreemptionFlag:
    """Set by SIGTERM (the kubelet's notice before a preemption or eviction) or Ctrl-C."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def install(self, worker: bool = False) -> None:
        """Handle SIGTERM and SIGINT by asking the training loop to save and stop.

        A `worker` under the launcher handles SIGINT only: the launcher turns the pod's SIGTERM
        into SIGINT for every worker, and sends SIGTERM itself only to stop the survivors of a
        failed worker, which must then exit at once instead of waiting on a collective."""

        def handler(signum: int, frame: FrameType | None) -> None:
            if not self.event.is_set():
                log.warning(
                    "received signal %d: stopping (at the next step, with a checkpoint)", signum
                )
            self.event.set()

        if not worker:
            signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    @property
    def is_set(self) -> bool:
        """Whether a stop was requested."""
        return self.event.is_set()

    def agreed(self) -> bool:
        """Whether a stop was requested on any rank (each rank of a run must ask together);
        if so, it now counts as requested on this rank too."""
        if agree(self.event.is_set()):
            self.event.set()
        return self.event.is_set()

    def check(self) -> None:
        """Raise StopRequestedError if a stop was requested on any rank (for work before
        training; every rank of a run calls it at the same points)."""
        if self.agreed():
            raise StopRequestedError


class RunCallback(TrainerCallback):  # type: ignore[misc]
    """Mirrors the Trainer's state into the tracker and history, marks checkpoints complete,
    and turns a preemption notice into "save now, then stop" (before training: "stop now").

    In a run of several workers every rank has one; rank 0 alone writes the history and the
    checkpoint markers (and holds the output `lock`: None on the other ranks), a marker only
    once every rank has written its part, and a stop notice on any rank stops every rank at
    the same step."""

    def __init__(
        self,
        tracker: ProgressTracker,
        store: CheckpointStore,
        history: History,
        preemption: PreemptionFlag,
        lock: OutputLock | None,
        rank: Rank | None = None,
    ) -> None:
        self.tracker = tracker
        self.store = store
        self.history = history
        self.preemption = preemption
        self.lock = lock
        self.rank = rank or Rank()
        self.started = False  # training started in this process
        self.training = False  # between the start and the end of train()
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
        self.started = self.training = True
        self._start_time = time.monotonic()
        self._start_step = state.global_step
        self._start_tokens = state.num_input_tokens_seen
        if self.rank.is_main:
            self.history.restart(state.log_history)
        resumed = f"resumed from checkpoint-{state.global_step}" if state.global_step else None
        self.tracker.update(
            phase=Phase.TRAINING,
            message=resumed,
            step=state.global_step,
            total_steps=state.max_steps,
            checkpoints=self.store.complete(),
        )

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        self.training = False

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if not self.started:  # an evaluation before training: stop it at once
            self.preemption.check()

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
        if self.preemption.agreed():
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
        if not logs or not self.training:  # evaluations before and after training are reported
            return
        if self.rank.is_main:
            self.history.append(logs, state.global_step, state.epoch)
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
        rank = self.rank
        if rank.is_distributed:
            barrier()  # every rank has written its part (an FSDP checkpoint is sharded)
            if rank.local_rank == 0 and not rank.is_main:
                self.store.upload_part(state.global_step)
            barrier()
        if self.lock is not None:
            self.lock.ensure_held()  # another run took the output over: not our checkpoint
            self.store.mark_complete(
                state.global_step,
                latest_eval(state.log_history, state.global_step),
                rank.world_size,
            )
        self.tracker.update(
            phase=Phase.PREEMPTED if self.preemption.is_set else Phase.TRAINING,
            message=None,
            checkpoints=self.store.complete(),
        )
