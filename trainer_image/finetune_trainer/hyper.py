"""Resolve `auto` hyperparameters into concrete values (rules documented in docs/training.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from finetune_trainer.config import RunConfig

if TYPE_CHECKING:
    from finetune_trainer.planning.plan import Resolved as Planned

Precision = Literal["bf16", "fp16", "fp32"]

# Peak learning rate by method when `learningRate: auto` (common defaults of the peft/trl docs).
AUTO_LEARNING_RATE = {
    "full": 2e-5,
    "lora": 2e-4,
    "dora": 2e-4,
    "qlora": 2e-4,
    "ia3": 3e-3,
    "prefix": 1e-2,
    "prompt": 3e-2,
}
#: learningRate auto of a preference objective (dpo, orpo): the method's rate divided by this
#: (preference tuning moves a model that already answers; TRL's defaults are lower still).
PREFERENCE_LR_DIVISOR = 10
CPU_AUTO_BATCH = 8
GPU_AUTO_BATCH_START = 64
# Tokens per device batch for `batchTokens: auto` on GPU when no memory estimate is given:
# about 4x the 3.6k real tokens of 8 long-tailed rows at seq 2048 (too little work for an 8B
# model on an H100/H200), and within a varlen kernel's linear memory (docs/training.md).
AUTO_BATCH_TOKENS = 16_384


def auto_epochs(n_train: int) -> int:
    """3 epochs under 10k examples, 2 under 100k, else 1 (small sets need more passes)."""
    if n_train < 10_000:
        return 3
    return 2 if n_train < 100_000 else 1


def resolve_precision(requested: str, device: str) -> Precision:
    """auto: bf16 where supported, else fp16 on GPU, fp32 on CPU."""
    if requested != "auto":
        return requested  # type: ignore[return-value]
    if device != "cuda":
        return "fp32"
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def probe_batch_size(model: Any, seq_len: int, start: int) -> int:
    """Largest batch (halving from `start`) whose forward+backward at `seq_len` fits in memory,
    found by trying, as accelerate's find_executable_batch_size does."""
    import torch
    from accelerate.utils import find_executable_batch_size

    device = next(model.parameters()).device

    def attempt(batch_size: int) -> int:
        ids = torch.zeros((batch_size, seq_len), dtype=torch.long, device=device)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        return batch_size

    found = int(find_executable_batch_size(attempt, starting_batch_size=start)())
    torch.cuda.empty_cache()
    return found


def pairs_per_batch(run: RunConfig, sequences: int) -> int:
    """The probed batch (`sequences` that fit one forward+backward) in preference pairs: each
    pair is two sequences; a full fine-tune under DPO also holds a frozen reference copy of
    the weights, which the probe did not see, so it gets half again."""
    if not run.preference:
        return sequences
    share = 4 if run.training.objective == "dpo" and run.method.type == "full" else 2
    return max(1, sequences // share)


def probe_batch_tokens(model: Any, budget: int, seq_len: int) -> int:
    """The largest token budget, shrinking from `budget`, whose forward+backward over one
    padding-free row of `seq_len`-token documents (the most attention work a budget can
    hold) fits in memory, found by trying as `probe_batch_size` does."""
    import torch
    from accelerate.utils import find_executable_batch_size

    device = next(model.parameters()).device

    def attempt(tokens: int) -> int:
        ids = torch.zeros((1, tokens), dtype=torch.long, device=device)
        positions = (torch.arange(tokens, device=device) % seq_len).unsqueeze(0)
        out = model(input_ids=ids, position_ids=positions, labels=ids)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        return tokens

    found = int(find_executable_batch_size(attempt, starting_batch_size=budget)())
    torch.cuda.empty_cache()
    return found


@dataclass(frozen=True)
class Resolved:
    """Concrete hyperparameters for one run."""

    epochs: float
    learning_rate: float
    batch_size: int | None  # None: probe on GPU once the model is loaded
    precision: Precision
    gradient_checkpointing: bool
    probe_start: int = GPU_AUTO_BATCH_START  # the probe's first batch size (from the estimate)


def resolve(run: RunConfig, n_train: int, device: str, planned: Planned | None = None) -> Resolved:
    """Resolve every `auto` that does not need the loaded model; `planned` is the memory
    estimate's resolution (finetune_trainer.planning) for this run on this GPU."""
    t = run.training
    epochs = float(auto_epochs(n_train) if t.epochs == "auto" else t.epochs)
    if t.learning_rate != "auto":
        lr = float(t.learning_rate)
    elif run.preference:
        lr = AUTO_LEARNING_RATE[run.method.type] / PREFERENCE_LR_DIVISOR
    else:
        lr = AUTO_LEARNING_RATE[run.method.type]
    if t.batch_size != "auto":
        batch: int | None = int(t.batch_size)
    elif device == "cuda":
        batch = None
    else:
        batch = min(CPU_AUTO_BATCH, max(n_train, 1))
    if t.gradient_checkpointing == "auto":
        # On GPU, recompute activations exactly when the estimate says the batch does not fit
        # without; never on CPU (it only costs time there).
        checkpointing = device == "cuda" and planned is not None and planned.gradient_checkpointing
    else:
        checkpointing = bool(t.gradient_checkpointing)
    return Resolved(
        epochs=epochs,
        learning_rate=lr,
        batch_size=batch,
        # prefix/prompt tuning: fp32 (mixed precision breaks TRL's fused LM head for them)
        precision="fp32"
        if run.method.type in ("prefix", "prompt")
        else resolve_precision(t.precision, device),
        gradient_checkpointing=checkpointing,
        probe_start=min(planned.batch_size if planned else GPU_AUTO_BATCH_START, max(n_train, 1)),
    )


def batch_tokens(
    run: RunConfig,
    device: str,
    *,
    attention: str | None,
    padding_free: bool,
    estimate: int | None = None,
) -> int | None:
    """Tokens per device batch (`training.batchTokens`), or None for rows of batchSize.

    auto sizes batches by tokens only where that is safe and pays: on CUDA, for padding-free
    (or packed) causal-LM batches, with batchSize auto and a varlen `attention` kernel
    (flash_attention_2, flex_attention: memory linear in tokens; SDPA materialises a
    tokens x tokens mask). The budget is `estimate` (the memory estimator's, when it gives
    one) or AUTO_BATCH_TOKENS; the runner then shrinks it to what fits
    (`probe_batch_tokens`)."""
    wanted = run.training.batch_tokens
    if wanted != "auto":
        return wanted
    usable = (
        device == "cuda"
        and run.task == "causal-lm"
        and not run.preference  # batches of pairs
        and padding_free
        and run.training.batch_size == "auto"
        and attention in ("flash_attention_2", "flex_attention")
    )
    if not usable:
        return None
    return estimate or AUTO_BATCH_TOKENS
