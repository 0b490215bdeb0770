"""Where this process stands in a distributed run, and the collectives the run adds to what
transformers does: agreeing on a stop, waiting for every rank.

The launcher (`finetune_trainer.launch`, PyTorch's elastic agent) starts one worker per GPU and
gives each the environment torchrun gives: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE and
GROUP_RANK (the node). A process started any other way is rank 0 of a world of one, and every
collective here is a no-op for it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ENV_SUMMARY_DIR = "FINETUNE_WORKER_SUMMARY_DIR"


@dataclass(frozen=True)
class Rank:
    """This process's place in the run (torchrun's environment variables)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Rank:
        """Read RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE and GROUP_RANK (default: alone)."""
        env = os.environ if env is None else env

        def number(name: str, default: int) -> int:
            value = env.get(name, "").strip()
            return int(value) if value else default

        return cls(
            rank=number("RANK", 0),
            local_rank=number("LOCAL_RANK", 0),
            world_size=number("WORLD_SIZE", 1),
            local_world_size=number("LOCAL_WORLD_SIZE", 1),
            node_rank=number("GROUP_RANK", 0),
        )

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that serves progress and writes the run's outputs."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """More than one process trains this run."""
        return self.world_size > 1

    @property
    def launched(self) -> bool:
        """Started by the launcher as one of several workers (not a single process)."""
        return self.world_size > 1 or ENV_SUMMARY_DIR in os.environ


def _initialized() -> bool:
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_initialized())


def _device() -> str:
    """The device collectives of this process use (NCCL needs CUDA tensors)."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def agree(flag: bool) -> bool:
    """True on every rank when `flag` is True on any rank (a MAX all-reduce); `flag` alone when
    the process group is not initialised."""
    if not _initialized():
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def smallest(value: int) -> int:
    """The smallest `value` over all ranks (e.g. the batch size every GPU can hold)."""
    if not _initialized():
        return value
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.int64, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def barrier() -> None:
    """Wait until every rank gets here (no-op when not distributed)."""
    if _initialized():
        import torch.distributed as dist

        dist.barrier()


class PeerFailedError(Exception):
    """Another rank failed in a step every rank takes (its own error, retryable)."""


_GLOO_PEER_ERRORS = ("Connection reset by peer", "Connection closed by peer", "gloo/transport")


def is_peer_loss(exc: BaseException) -> bool:
    """Whether `exc` says another rank went away (a collective, NCCL's watchdog or the store
    failed) rather than that this rank's own work failed. Gloo reports a dead peer as a plain
    RuntimeError from its TCP transport."""
    if not Rank.from_env().is_distributed:
        return False
    from torch.distributed import DistError

    if isinstance(exc, DistError | PeerFailedError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _GLOO_PEER_ERRORS)


def init_group(timeout_seconds: int) -> None:
    """Join the run's process group now (NCCL on GPUs, gloo on CPU), before transformers
    would, so that the ranks can agree on failures and stops from the first step of the run;
    `timeout_seconds` bounds how long a collective waits for a rank that went away."""
    rank = Rank.from_env()
    if not rank.is_distributed or _initialized():
        return
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(rank.local_rank)
    dist.init_process_group(
        backend="nccl" if torch.cuda.is_available() else "gloo",
        timeout=timedelta(seconds=timeout_seconds),
    )


def settle(error: BaseException | None) -> None:
    """Every rank calls this after a step that may fail (the data, the model): when any rank
    failed, every rank raises. The rank that failed re-raises its own error; the others raise
    the same invalid-input error (so that every rank exits 65 for a bad dataset) or, for any
    other failure, PeerFailedError naming the rank. A no-op when not distributed."""
    from finetune_trainer.errors import InvalidInputError

    if not _initialized():
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    kind = None if error is None else ("input" if isinstance(error, InvalidInputError) else "other")
    mine = (kind, str(error) if error is not None else "")
    reports: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, mine)
    if error is not None:
        raise error
    failed = [(rank, k, m) for rank, (k, m) in enumerate(reports) if k is not None]
    if not failed:
        return
    invalid = [f for f in failed if f[1] == "input"]
    rank, _, message = (invalid or failed)[0]
    if invalid:
        raise InvalidInputError(message)
    raise PeerFailedError(f"rank {rank} failed: {message}")


def enable_cpu_fsdp() -> None:
    """Let accelerate run FSDP2 on CPU workers (gloo), as it does on GPUs.

    accelerate switches to FSDP only for accelerator backends and silently falls back to DDP
    on CPU, although PyTorch's FSDP2 (`fully_shard`) runs on gloo. CPU-only clusters (and this
    project's CI) train sharded this way; on GPUs nothing changes. The patch marks the shared
    accelerate state as FSDP whenever an FSDP plugin is given to a multi-CPU run."""
    import accelerate.state as state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__
    if getattr(original, "_finetune_cpu_fsdp", False):
        return

    def init(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # AcceleratorState() re-reads the process state on every call: keep FSDP there too
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    init._finetune_cpu_fsdp = True  # type: ignore[attr-defined]
    state.AcceleratorState.__init__ = init
