"""How the workers of a run share the training: one process, DDP, or FSDP2 (through
transformers and accelerate), and the TrainingArguments that say so.

DDP: every worker holds the whole model and a slice of each global batch; gradients are
all-reduced. FSDP2: parameters, gradients and optimizer state are sharded over the workers
(or, with `sharding: node`, over the GPUs of each pod and replicated across pods: HSDP).
`auto` picks FSDP only when the model's training state does not fit one GPU (see
`resolve`); adapters on a base that fits train under DDP.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from finetune_trainer.config import RunConfig
from finetune_trainer.distributed import Rank, enable_cpu_fsdp

log = logging.getLogger(__name__)

Kind = Literal["single", "ddp", "fsdp"]
# Bytes a full fine-tune keeps per parameter in mixed precision with AdamW: weights, gradients,
# fp32 master weights and two moments (the classic 16 bytes/parameter).
FULL_TRAINING_BYTES_PER_PARAM = 16
# The share of a GPU the training state may take before auto shards it (the rest: activations).
AUTO_FSDP_SHARE = 0.6


@dataclass(frozen=True)
class Strategy:
    """The resolved way of training: `kind`, over `world_size` workers, and why."""

    kind: Kind
    world_size: int = 1
    reason: str = "one worker"

    @property
    def fsdp(self) -> bool:
        """Training state sharded with FSDP2."""
        return self.kind == "fsdp"


def training_state_bytes(run: RunConfig, params: int) -> int:
    """What one worker holds for a full fine-tune of `params` parameters under DDP (the
    estimate behind `auto`; an adapter's training state is negligible)."""
    if run.method.type != "full":
        return 0
    return params * FULL_TRAINING_BYTES_PER_PARAM


def resolve(run: RunConfig, rank: Rank, params: int, gpu_memory: int | None) -> Strategy:
    """The strategy for this run (see `choose`), for this worker's group."""
    return choose(run, rank.world_size if rank.is_distributed else 1, params, gpu_memory)


def choose(run: RunConfig, world_size: int, params: int, gpu_memory: int | None) -> Strategy:
    """The strategy for `world_size` workers: one process; else the spec's choice; `auto` is
    FSDP when a full fine-tune's training state (16 bytes/parameter) would take more than 60 %
    of the GPU (`gpu_memory` bytes; None on CPU, where auto is DDP), else DDP."""
    if world_size <= 1:
        return Strategy("single")
    chosen = run.training.distributed.strategy
    if chosen != "auto":
        return Strategy(chosen, world_size, f"training.distributed.strategy: {chosen}")
    state = training_state_bytes(run, params)
    if gpu_memory is not None and state > AUTO_FSDP_SHARE * gpu_memory:
        return Strategy(
            "fsdp",
            world_size,
            f"auto: the training state ({state / 2**30:.1f} GiB) does not fit one GPU "
            f"({gpu_memory / 2**30:.1f} GiB)",
        )
    return Strategy("ddp", world_size, "auto: the model and its training state fit one GPU")


def _layers_to_wrap(model: Any) -> list[str]:
    """The transformer block classes FSDP shards one by one (the model's own list)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(getattr(base, "_no_split_modules", None) or [])


def training_arguments(
    run: RunConfig,
    strategy: Strategy,
    rank: Rank,
    model: Any,
    device: str,
    gradient_checkpointing: bool,
) -> dict[str, Any]:
    """TrainingArguments for the strategy (none for a single process)."""
    if strategy.kind == "single":
        return {}
    args: dict[str, Any] = {
        "ddp_backend": "nccl" if device == "cuda" else "gloo",
        "ddp_timeout": run.training.distributed.timeout_seconds,
    }
    if strategy.kind == "ddp":
        return args
    if device == "cpu":
        enable_cpu_fsdp()
    fsdp = run.training.distributed.fsdp
    config: dict[str, Any] = {
        "version": 2,
        "state_dict_type": "SHARDED_STATE_DICT",  # each rank writes its shard of a checkpoint
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "cpu_offload": bool(fsdp and fsdp.cpu_offload),
        # FSDP's own activation checkpointing (transformers' would all-gather twice)
        "activation_checkpointing": gradient_checkpointing,
    }
    if layers := _layers_to_wrap(model):
        config["transformer_layer_cls_to_wrap"] = layers
    args.update(fsdp=True, fsdp_config=config, gradient_checkpointing=False)
    if fsdp is not None and fsdp.sharding == "node":
        from accelerate.parallelism_config import ParallelismConfig

        args["parallelism_config"] = ParallelismConfig(
            dp_replicate_size=rank.world_size // rank.local_world_size,
            dp_shard_size=rank.local_world_size,
        )
    return args
