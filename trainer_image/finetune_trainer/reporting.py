"""Run with the contract's reporting: progress server, SIGTERM handling, error mapping,
termination message and exit code. Shared by the container entrypoint and `finetune run`."""

from __future__ import annotations

import logging
import os
import traceback
from pathlib import Path

from finetune_trainer.config import RunConfig
from finetune_trainer.distributed import ENV_SUMMARY_DIR, Rank, is_peer_loss
from finetune_trainer.errors import InvalidInputError, TransientError, chain, classify
from finetune_trainer.lock import OutputLockLostError
from finetune_trainer.progress import (
    ENV_TERMINATION_PATH,
    TERMINATION_MESSAGE_PATH,
    ExitCode,
    Outcome,
    Phase,
    Summary,
)
from finetune_trainer.runner import RunContext, execute
from finetune_trainer.server import ProgressServer

log = logging.getLogger(__name__)


def termination_path() -> Path:
    """Where this process's final summary goes: the kubelet's termination-message file, or,
    for a worker under the launcher, its rank's file in the launcher's summary directory."""
    workers = os.environ.get(ENV_SUMMARY_DIR)
    if workers:
        from finetune_trainer.launch import summary_path

        return summary_path(Path(workers), Rank.from_env().rank)
    return Path(os.environ.get(ENV_TERMINATION_PATH, TERMINATION_MESSAGE_PATH))


def write_termination_message(summary: Summary) -> Path | None:
    """Write the final summary (<= 4 KiB) where the kubelet (or the launcher) reads it."""
    path = termination_path()
    try:
        path.write_text(summary.to_termination_message())
    except OSError as exc:  # e.g. running locally without /dev/termination-log
        log.debug("no termination message written to %s: %s", path, exc)
        return None
    return path


def exit_code(summary: Summary) -> ExitCode:
    """The exit code the operator expects for a run's outcome."""
    return summary.exit_code()


def _where(exc: BaseException) -> str:
    """The file an OS error in `exc`'s chain names, if any (else the message has no prefix)."""
    for link in chain(exc):
        if isinstance(link, OSError) and link.filename is not None:
            return str(link.filename)
    return ""


def _failure(exc: BaseException) -> Summary:
    if isinstance(exc, OutputLockLostError):  # retryable: the other run may be gone by then
        return Summary(outcome=Outcome.FAILED, reason="OutputLockLost", message=str(exc))
    if is_peer_loss(exc):
        return Summary(
            outcome=Outcome.FAILED,
            reason="PeerLost",
            message=f"lost another rank of the group ({type(exc).__name__}: {exc}); the group "
            "restarts from the last complete checkpoint",
        )
    found = classify(exc, _where(exc))
    if isinstance(found, InvalidInputError):
        return Summary(outcome=Outcome.INVALID_INPUT, reason="InvalidInput", message=str(found))
    if isinstance(found, TransientError):
        return Summary(outcome=Outcome.FAILED, reason="Transient", message=str(found))
    name = type(exc).__name__
    if "OutOfMemory" in name:
        return Summary(
            outcome=Outcome.FAILED,
            reason="OutOfMemory",
            message=f"{exc}. Lower training.batchSize or dataset.maxSeqLength, enable "
            "training.gradientCheckpointing, or use qlora.",
        )
    return Summary(outcome=Outcome.FAILED, reason="TrainerError", message=f"{name}: {exc}")


def run_reported(run: RunConfig, ctx: RunContext, *, progress_port: int | None) -> Summary:
    """Execute the run, never raising: every outcome becomes a Summary (also written to the
    termination-message file). `progress_port` None or 0 serves no /progress."""
    rank = Rank.from_env()
    ctx.preemption.install(worker=rank.launched)
    server = (
        ProgressServer(ctx.tracker, progress_port).start()
        if progress_port and rank.is_main
        else None
    )
    try:
        summary = execute(run, ctx)
    except Exception as exc:  # every failure must still produce a summary and an exit code
        summary = _failure(exc)
        if summary.reason == "TrainerError":  # a bug: its traceback is the report
            log.error("run failed:\n%s", traceback.format_exc())
        else:
            log.error("%s: %s", summary.reason, summary.message)
            log.debug("raised at:\n%s", traceback.format_exc())
    final = {
        Outcome.SUCCEEDED: Phase.SUCCEEDED,
        Outcome.PREEMPTED: Phase.PREEMPTED,
    }.get(summary.outcome, Phase.FAILED)
    ctx.tracker.phase(final, summary.message)
    write_termination_message(summary)
    if server:
        server.close()
    return summary
