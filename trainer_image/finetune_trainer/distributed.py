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


_GLOO_PEER_ERRORS = ("Connection reset by peer", "Connection closed by peer", "gloo/transport")


def is_peer_loss(exc: BaseException) -> bool:
    """Whether `exc` says another rank went away (a collective, NCCL's watchdog or the store
    failed) rather than that this rank's own work failed. Gloo reports a dead peer as a plain
    RuntimeError from its TCP transport."""
    if not Rank.from_env().is_distributed:
        return False
    from torch.distributed import DistError

    if isinstance(exc, DistError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _GLOO_PEER_ERRORS)
