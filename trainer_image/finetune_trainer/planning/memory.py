"""Per-GPU peak memory of a training run, from the model's shape and counts alone.

The model (documented with its residuals in docs/planning.md):

- **weights**: the frozen base in its load dtype; a k-bit base packs its linear layers
  (nf4/fp4: 0.5 byte per weight plus one fp32 absmax per 64 weights, or with double
  quantization one byte per 64 and an fp32 per 16,384) and keeps the rest in fp32
  (`prepare_model_for_kbit_training` upcasts them); 8-bit: one byte per weight plus an fp32
  scale per row; the largest layer is dequantized for its matmul. FSDP shards weights, gradients and optimizer state over the workers and
  all-gathers one block at a time (two with prefetch).
- **trainable weights, gradients, optimizer state**: adapters are fp32 (peft upcasts them);
  gradients have the parameter's dtype; AdamW keeps two moments in the parameter's dtype
  (a bf16 full fine-tune trains bf16 weights, no fp32 master copy; fp16 loads fp32 weights).
- **activations**: what backward keeps per token and layer, counted from the Llama layer
  (norms in fp32, q/k/v/o and MLP projections, SDPA's saved q/k/v/output, LoRA's dropout),
  scaled by one factor fitted to the GPU measurements; with gradient checkpointing only each
  layer's input is kept, plus one layer recomputed during backward. A k-bit base runs its norms
  and residual stream in fp32.
- **logits and loss**: the LM head's output over the vocabulary for every token of the
  micro-batch, its fp32 upcast, the cross-entropy's saved softmax and its gradient
  (Liger's fused linear cross-entropy computes it in chunks instead).
- **attention masks**: without flash-attention, SDPA gets an explicit mask (padding, or the
  block-diagonal mask of a padding-free row) and materialises scores of one layer for every
  head and row: heads x rows x row length^2 x 2 bytes, quadratic in the row length.
- **CUDA context and allocator slack**: added for the fit, not part of `allocated`.

The worst case is the micro-batch with the most tokens: `batch x maxSeqLength` (packed or
padded to max length), the longest `batch` examples of the data when they are known
(padding-free), or `batch x` the longest example (padded to the batch's longest).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from finetune_trainer.planning.shape import ModelShape, ParamCounts

GIB = 2**30
Layout = Literal["padding-free", "packed", "padded", "padded-max"]

# CUDA context, cuBLAS workspaces and kernels outside max_memory_allocated
CUDA_CONTEXT_BYTES = int(0.75 * GIB)
# caching-allocator fragmentation over the allocated peak
ALLOCATOR_SLACK = 0.08
# fitted to docs/planning.md's measurements (one factor for every model and method)
ACTIVATION_SCALE = 0.85
# bytes per token and vocabulary entry of the logits and loss: bf16 logits (2), their fp32
# upcast (4), the cross-entropy's saved log-softmax (4) and the bf16 gradient (2); a k-bit
# base's fp32 head adds 2 (fitted to the padded-to-max-length measurements)
LOGITS_BYTES = 12
# Liger's fused linear cross-entropy: a chunk of the logits at a time
LIGER_LOGITS_BYTES = 1
# AdamW: two moments per trainable parameter
ADAM_STATES = 2


@dataclass(frozen=True)
class Setup:
    """What a run's memory depends on, resolved (no `auto` left)."""

    method: str
    compute_bytes: int  # 2 for bf16/fp16, 4 for fp32
    weight_bytes: int  # bytes of a base parameter as loaded
    batch_size: int
    max_seq_length: int
    layout: Layout
    gradient_checkpointing: bool
    quant_bits: int | None = None
    double_quant: bool = True
    liger: bool = False
    flash_attention: bool = False
    world_size: int = 1
    fsdp: bool = False
    causal_lm: bool = True
    lengths: Sequence[int] | None = None  # the training examples' token counts, when known
    pairs: bool = False  # dpo/orpo: every example is a chosen and a rejected sequence
    reference_copy: bool = False  # full fine-tune under dpo: a frozen copy of the weights

    @property
    def kbit(self) -> bool:
        """The base is loaded in 4 or 8 bits."""
        return self.quant_bits is not None


def worst_batch(setup: Setup) -> tuple[int, int, int]:
    """The micro-batch with the most tokens: (tokens, rows, longest row)."""
    b, seq = setup.batch_size * (2 if setup.pairs else 1), setup.max_seq_length
    lengths = sorted((min(n, seq) for n in setup.lengths or ()), reverse=True)
    longest = lengths[0] if lengths else seq
    if setup.layout == "packed" or (setup.layout == "padding-free" and not lengths):
        return b * seq, 1, b * seq
    if setup.layout == "padding-free":
        tokens = sum(lengths[:b])
        return tokens, 1, tokens
    if setup.layout == "padded":
        return b * longest, b, longest
    return b * seq, b, seq


def _layer_bytes_per_token(shape: ModelShape, setup: Setup) -> float:
    """Bytes one layer keeps for backward per token (no checkpointing)."""
    d, ffn = shape.hidden, shape.intermediate
    q = shape.heads * shape.dim_head
    kv = shape.kv_heads * shape.dim_head
    e = setup.compute_bytes
    norms = 2 * (4 * d + e * d)  # fp32 input and the normalised output, twice
    attention = e * (2 * q + 2 * kv)  # SDPA keeps q, k, v and its output
    rope = e * (q + kv)
    mlp = e * 3 * ffn  # gate output, its activation, up output
    # the inputs of q/k/v, o, gate/up and down (a full fine-tune's weight gradients need them;
    # adapters keep their dropout outputs instead, plus the dropout masks)
    inputs = e * (3 * d + ffn) + (0 if setup.method == "full" else 2 * d)
    residual = 4 * 2 * d if setup.kbit else 0  # fp32 residual stream of a k-bit base
    return ACTIVATION_SCALE * (norms + attention + rope + mlp + inputs + residual)


@dataclass(frozen=True)
class MemoryEstimate:
    """A per-GPU peak-memory breakdown (bytes) and the worst-case micro-batch it assumed."""

    parts: dict[str, int]
    tokens: int
    rows: int
    row_length: int
    overhead: dict[str, int] = field(default_factory=dict)

    @property
    def allocated(self) -> int:
        """Peak bytes of tensors (what torch.cuda.max_memory_allocated reports)."""
        return sum(self.parts.values())

    @property
    def total(self) -> int:
        """Peak bytes of the GPU the process needs: tensors, context and allocator slack."""
        return self.allocated + sum(self.overhead.values())

    def fits(self, gpu_bytes: int) -> bool:
        """Whether the worst case fits a GPU of `gpu_bytes`."""
        return self.total <= gpu_bytes


def _weights(shape: ModelShape, params: ParamCounts, setup: Setup) -> tuple[int, int]:
    """(weights, quantization constants) of the base model on one GPU."""
    base = params.total if setup.method == "full" else params.frozen
    if not setup.kbit:
        return base * setup.weight_bytes, 0
    packed = min(params.quantizable, base)
    rest = (base - packed) * 4  # prepare_model_for_kbit_training: fp32
    # the largest layer dequantized for its matmul, in the compute dtype
    buffer = params.largest_linear * setup.compute_bytes
    if setup.quant_bits == 8:
        return packed + rest, shape.layers * 7 * shape.hidden * 4 + buffer
    constants = packed // 64 + packed // (64 * 256) * 4 if setup.double_quant else packed // 16
    return packed // 2 + rest, constants + buffer


def estimate(shape: ModelShape, params: ParamCounts, setup: Setup) -> MemoryEstimate:
    """The per-GPU peak memory of training with `setup`."""
    tokens, rows, row = worst_batch(setup)
    world = max(setup.world_size, 1)
    shard = world if setup.fsdp else 1
    weights, quant = _weights(shape, params, setup)
    trainable_bytes = setup.weight_bytes if setup.method == "full" else 4
    trainable = params.trainable * trainable_bytes
    parts: dict[str, int] = {
        "weights": weights // shard,
        "quantization": quant // shard,
        "trainable": 0 if setup.method == "full" else trainable // shard,
        "gradients": trainable // shard,
        "optimizer": ADAM_STATES * trainable // shard,
        "reference": weights // shard if setup.reference_copy else 0,
    }
    if setup.fsdp:  # two gathered blocks (the current one and the prefetched next)
        block = (params.total - shape.vocab * shape.hidden) // max(shape.layers, 1)
        parts["gathered"] = 2 * block * setup.weight_bytes
    elif world > 1:  # DDP's gradient buckets
        parts["gradients"] += trainable
    layer = _layer_bytes_per_token(shape, setup)
    if setup.gradient_checkpointing:
        kept = shape.layers * shape.hidden * (4 if setup.kbit else setup.compute_bytes)
        activations = tokens * (kept + layer)
    else:
        activations = tokens * shape.layers * layer
    parts["activations"] = int(activations)
    if setup.causal_lm:
        per_vocab = LIGER_LOGITS_BYTES if setup.liger else LOGITS_BYTES + (2 if setup.kbit else 0)
        parts["logits"] = tokens * shape.vocab * per_vocab
    if not setup.flash_attention:
        parts["attention"] = shape.heads * rows * row * row * 2
    overhead = {
        "cuda_context": CUDA_CONTEXT_BYTES,
        "allocator": int(ALLOCATOR_SLACK * sum(parts.values())),
    }
    return MemoryEstimate(parts, tokens, rows, row, overhead)
