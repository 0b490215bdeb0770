"""Start one worker per GPU (or per process on CPU) with PyTorch's elastic launcher, and keep
the contract's promises for the group: exit codes 65 and 75 survive the launcher, a SIGTERM to
the pod becomes one collective checkpoint, and a dead worker stops the others at once.

The group is described by torchrun's own environment variables (the operator sets them on each
pod of an Indexed Job; `finetune run --nproc-per-node` sets them locally):

    PET_NNODES           pods in the group                    (default 1)
    PET_NPROC_PER_NODE   workers per pod, one per GPU          (default 1)
    PET_NODE_RANK        this pod's index (JOB_COMPLETION_INDEX when unset)
    PET_MASTER_ADDR      pod 0's stable DNS name               (default 127.0.0.1)
    PET_MASTER_PORT      rendezvous port on pod 0              (default 29500)

Rendezvous is static (node rank = pod index, so global rank 0 is always on pod 0, where the
operator reads /progress). Workers are this same trainer (`python -m finetune_trainer`); each
writes its summary to a file, and the launcher turns them into the pod's one summary and exit
code (`merge_outcomes`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from finetune_trainer.distributed import ENV_SUMMARY_DIR
from finetune_trainer.progress import (
    ENV_JOB_COMPLETION_INDEX,
    ENV_MASTER_ADDR,
    ENV_MASTER_PORT,
    ENV_NNODES,
    ENV_NODE_RANK,
    ENV_NPROC_PER_NODE,
    ENV_RDZV_TIMEOUT,
    ENV_SHUTDOWN_TIMEOUT,
    ExitCode,
    Outcome,
    Summary,
)

log = logging.getLogger(__name__)

DEFAULT_MASTER_PORT = 29500
DEFAULT_RDZV_TIMEOUT = 900
DEFAULT_SHUTDOWN_TIMEOUT = 270  # inside the pod's 300 s grace period
STOPPED_BY_LAUNCHER = -int(signal.SIGTERM)  # a worker the launcher stopped after another failed


@dataclass(frozen=True)
class Group:
    """The processes of one run: `nnodes` pods of `nproc_per_node` workers."""

    nnodes: int = 1
    nproc_per_node: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT
    rdzv_timeout: int = DEFAULT_RDZV_TIMEOUT
    shutdown_timeout: int = DEFAULT_SHUTDOWN_TIMEOUT

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Group:
        """The group from torchrun's PET_* variables (a group of one when none is set)."""
        env = os.environ if env is None else env

        def number(name: str, default: int) -> int:
            value = env.get(name, "").strip()
            return int(value) if value else default

        return cls(
            nnodes=number(ENV_NNODES, 1),
            nproc_per_node=number(ENV_NPROC_PER_NODE, 1),
            node_rank=number(ENV_NODE_RANK, number(ENV_JOB_COMPLETION_INDEX, 0)),
            master_addr=env.get(ENV_MASTER_ADDR, "").strip() or "127.0.0.1",
            master_port=number(ENV_MASTER_PORT, DEFAULT_MASTER_PORT),
            rdzv_timeout=number(ENV_RDZV_TIMEOUT, DEFAULT_RDZV_TIMEOUT),
            shutdown_timeout=number(ENV_SHUTDOWN_TIMEOUT, DEFAULT_SHUTDOWN_TIMEOUT),
        )

    @property
    def world_size(self) -> int:
        """Workers in the whole group."""
        return self.nnodes * self.nproc_per_node

    def ranks(self) -> range:
        """The global ranks of this pod's workers."""
        first = self.node_rank * self.nproc_per_node
        return range(first, first + self.nproc_per_node)


@dataclass(frozen=True)
class WorkerOutcome:
    """How one worker ended: its exit code (negative: killed by that signal) and its summary."""

    rank: int
    exit_code: int
    summary: Summary | None = None

    @property
    def killed_by(self) -> str | None:
        """The signal's name when a signal ended the worker."""
        if self.exit_code >= 0:
            return None
        try:
            return signal.Signals(-self.exit_code).name
        except ValueError:
            return f"signal {-self.exit_code}"


def summary_path(directory: Path, rank: int) -> Path:
    """Where worker `rank` writes its summary for the launcher."""
    return directory / f"rank-{rank}.json"


def _describe(outcome: WorkerOutcome) -> str:
    if outcome.summary is not None and outcome.summary.message:
        return outcome.summary.message
    if outcome.killed_by is not None:
        hint = " (out of memory?)" if outcome.killed_by == "SIGKILL" else ""
        return f"killed by {outcome.killed_by}{hint}"
    return f"exited with code {outcome.exit_code} without a summary"


def merge_outcomes(group: Group, outcomes: Mapping[int, WorkerOutcome]) -> Summary:
    """The pod's one summary from its workers' outcomes.

    Invalid input on any rank wins (exit 65, never retried); then the first worker that failed
    by itself (an error, a crash, a kill) — not one that only lost a peer or was stopped by
    the launcher; then a preemption (exit 75) when every worker that stopped early saved;
    then a lost peer (another pod failed); else success, with rank 0's summary where this pod
    holds rank 0.
    """
    ordered = [outcomes[r] for r in sorted(outcomes)]

    def tagged(outcome: WorkerOutcome, summary: Summary) -> Summary:
        prefix = f"rank {outcome.rank}: " if group.world_size > 1 else ""
        return summary.model_copy(update={"message": prefix + _describe(outcome)})

    for o in ordered:
        if o.summary is not None and o.summary.outcome == Outcome.INVALID_INPUT:
            return tagged(o, o.summary)
    for o in ordered:
        own_failure = o.exit_code not in (0, int(ExitCode.PREEMPTED), STOPPED_BY_LAUNCHER)
        if not own_failure or (o.summary is not None and o.summary.reason == "PeerLost"):
            continue
        base = o.summary or Summary(outcome=Outcome.FAILED, reason="WorkerFailed")
        if base.outcome != Outcome.FAILED:
            base = Summary(outcome=Outcome.FAILED, reason="WorkerFailed")
        return tagged(o, base)
    preempted = [o for o in ordered if o.exit_code == int(ExitCode.PREEMPTED)]
    lost = [o for o in ordered if o.summary is not None and o.summary.reason == "PeerLost"]
    if preempted and not lost:
        first = next((o for o in preempted if o.rank == 0), preempted[0])
        return first.summary or Summary(outcome=Outcome.PREEMPTED, reason="Preempted")
    if lost:
        return tagged(lost[0], lost[0].summary or Summary(outcome=Outcome.FAILED))
    stopped = [o for o in ordered if o.exit_code != 0]
    if stopped:  # stopped by the launcher with no failure of their own: the group was told to stop
        return Summary(
            outcome=Outcome.FAILED,
            reason="WorkerFailed",
            message=f"rank {stopped[0].rank}: {_describe(stopped[0])}",
        )
    main = outcomes.get(0)
    if main is not None and main.summary is not None:
        return main.summary
    return Summary(
        outcome=Outcome.SUCCEEDED,
        reason="Succeeded",
        message=f"node {group.node_rank}: ranks {group.ranks().start}-{group.ranks().stop - 1} "
        "finished; rank 0 reports the run",
    )


def _read_summary(directory: Path, rank: int) -> Summary | None:
    path = summary_path(directory, rank)
    if not path.exists():
        return None
    return Summary.from_termination_message(path.read_text())


def _forward_sigterm_as_sigint() -> None:
    """The pod's SIGTERM (preemption, suspension) becomes the launcher's SIGINT, which it sends
    on to every worker: SIGINT means "save a checkpoint and stop" to a worker, while SIGTERM,
    what the launcher sends when another worker failed, means "stop now"."""

    def handler(signum: int, frame: FrameType | None) -> None:
        signal.raise_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, handler)


def launch(group: Group, command: list[str], log_dir: Path | None = None) -> Summary:
    """Run `command` (this trainer, as a worker) once per local rank under PyTorch's elastic
    agent with static rendezvous at the group's master, and return the pod's merged summary.
    The workers write to this process's output, or to files under `log_dir`."""
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=group.nnodes,
        max_nodes=group.nnodes,
        nproc_per_node=group.nproc_per_node,
        run_id="finetune",
        rdzv_backend="static",
        rdzv_endpoint=f"{group.master_addr}:{group.master_port}",
        rdzv_configs={"rank": group.node_rank, "timeout": group.rdzv_timeout},
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
        signals_to_handle="SIGINT,SIGHUP,SIGQUIT",
        shutdown_timeout=group.shutdown_timeout,
        logs_specs=DefaultLogsSpecs(str(log_dir), redirects=Std.ALL) if log_dir else None,
    )
    with tempfile.TemporaryDirectory(prefix="finetune-workers-") as tmp:
        directory = Path(tmp)
        os.environ[ENV_SUMMARY_DIR] = str(directory)
        _forward_sigterm_as_sigint()
        exit_codes = {rank: 0 for rank in group.ranks()}
        try:
            elastic_launch(config, command[0])(*command[1:])
        except ChildFailedError as exc:
            for rank, failure in exc.failures.items():
                exit_codes[rank] = failure.exitcode
        except SignalException as exc:
            log.warning("received %s: workers were asked to save and stop", exc.sigval.name)
            for rank in group.ranks():
                summary = _read_summary(directory, rank)
                exit_codes[rank] = -int(exc.sigval) if summary is None else summary.exit_code()
        finally:
            os.environ.pop(ENV_SUMMARY_DIR, None)
        outcomes = {
            rank: WorkerOutcome(rank, code, _read_summary(directory, rank))
            for rank, code in exit_codes.items()
        }
    return merge_outcomes(group, outcomes)


def worker_command() -> list[str]:
    """How the launcher starts a worker: this trainer's entrypoint, same interpreter."""
    return [sys.executable, "-u", "-m", "finetune_trainer"]
