"""Model FLOPs of training: what a token costs, for time estimates and MFU."""

from __future__ import annotations

from collections.abc import Sequence

from finetune_trainer.planning.shape import ModelShape


def training_flops(
    shape: ModelShape, lengths: Sequence[int], method: str, lora_params: int
) -> float:
    """Model FLOPs of one training pass over examples of the given real lengths.

    Per token: 6·N for a full fine-tune (forward 2N, backward 4N), 4·N for a frozen base
    (LoRA/QLoRA: forward 2N plus the activation gradients 2N; no weight gradients), plus 6·P for
    the P trainable adapter parameters. N counts every matmul parameter a token meets
    (attention and MLP projections and the LM head). Attention scores and values add, per
    example of length s and per layer, 2·s²·(heads·head_dim) forward FLOPs (causal: half of
    the 4·s²·d of a full square), times 3 for forward plus backward. Padding, recomputation
    (gradient checkpointing) and masked-out attention blocks are not counted: only useful work.
    """
    n = shape.linear_params()
    per_token = 6 * n if method == "full" else 4 * n + 6 * lora_params
    attn_dim = shape.heads * shape.dim_head
    tokens = sum(lengths)
    attention = sum(3 * 2 * shape.layers * attn_dim * s * s for s in lengths)
    return float(per_token * tokens + attention)
