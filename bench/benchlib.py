"""Pure helpers shared by the benchmarks (no torch import): data shapes, FLOPs, statistics.

Kept import-light so `tests/unit/test_bench.py` can check them quickly.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

# Peak dense bf16 tensor throughput (FLOP/s) by device name fragment, for MFU.
PEAK_BF16_FLOPS = {
    "H200": 989.4e12,
    "H100 PCIe": 756.0e12,
    "H100": 989.4e12,  # SXM / HBM3
    "A100": 312.0e12,
    "L40S": 362.05e12,
    "L4": 121.0e12,
}


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only transformer (Llama family)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: int | None = None
    rope_theta: float = 10000.0

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def linear_params(self) -> int:
        """Parameters of every matmul a token passes through: attention, MLP and the LM head
        (the embedding lookup is not a matmul; a tied head still costs its matmul)."""
        d, hd = self.hidden, self.dim_head
        attn = d * self.heads * hd * 2 + d * self.kv_heads * hd * 2  # q, o ; k, v
        mlp = 3 * d * self.intermediate  # gate, up, down
        return self.layers * (attn + mlp) + d * self.vocab

    def total_params(self) -> int:
        """All parameters (embeddings, norms, head unless tied)."""
        norms = (2 * self.layers + 1) * self.hidden
        embed = self.vocab * self.hidden
        head = 0 if self.tied else self.vocab * self.hidden
        return self.linear_params() - self.hidden * self.vocab + embed + head + norms

    def lora_params(self, r: int, modules: Sequence[str]) -> int:
        """Trainable LoRA parameters for rank r on the named projections of every layer."""
        d, hd = self.hidden, self.dim_head
        shapes = {
            "q_proj": (d, self.heads * hd),
            "k_proj": (d, self.kv_heads * hd),
            "v_proj": (d, self.kv_heads * hd),
            "o_proj": (self.heads * hd, d),
            "gate_proj": (d, self.intermediate),
            "up_proj": (d, self.intermediate),
            "down_proj": (self.intermediate, d),
        }
        return self.layers * sum(r * (shapes[m][0] + shapes[m][1]) for m in modules)


SHAPES = {
    # the 2-layer test model of tests/conftest.py, with a 512-token vocabulary
    "tiny": ModelShape("tiny", 64, 128, 2, 4, 2, 512, tied=False),
    # a 4-layer model big enough that matmuls, not Python, dominate a CPU step
    "small": ModelShape("small", 256, 768, 4, 8, 4, 8192, tied=True),
    # HuggingFaceTB/SmolLM2-135M(-Instruct)
    "smollm2-135m": ModelShape("smollm2-135m", 576, 1536, 30, 9, 3, 49152, tied=True),
    # meta-llama/Llama-3.2-1B and Llama-3.1-8B (config.json shapes)
    "llama-3.2-1b": ModelShape(
        "llama-3.2-1b", 2048, 8192, 16, 32, 8, 128256, tied=True, head_dim=64, rope_theta=5e5
    ),
    "llama-3.1-8b": ModelShape(
        "llama-3.1-8b", 4096, 14336, 32, 32, 8, 128256, tied=False, head_dim=128, rope_theta=5e5
    ),
}


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


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU by name (None when unknown)."""
    for key, value in PEAK_BF16_FLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None


def sample_lengths(
    n: int,
    max_len: int,
    seed: int,
    *,
    median_frac: float = 0.12,
    sigma: float = 1.0,
    tail_frac: float = 0.05,
    min_len: int = 16,
) -> list[int]:
    """Long-tailed example lengths, as in instruction data: log-normal with median
    `median_frac·max_len` (most examples short), plus `tail_frac` of examples at the
    maximum (long documents truncated to max_len). Seeded, deterministic."""
    rng = random.Random(seed)
    mu = math.log(median_frac * max_len)
    out = []
    for _ in range(n):
        if rng.random() < tail_frac:
            out.append(max_len)
            continue
        value = round(math.exp(rng.gauss(mu, sigma)))
        out.append(max(min_len, min(max_len, value)))
    return out


def markov_examples(
    lengths: Sequence[int],
    vocab: int,
    seed: int,
    *,
    first_id: int = 2,
    branching: int = 4,
    states: int = 2048,
    prompt_frac: tuple[float, float] = (0.2, 0.6),
) -> tuple[list[list[int]], list[list[int]]]:
    """Learnable token sequences of the given lengths and their completion masks.

    Tokens follow a fixed random Markov chain over `states` ids (each id has `branching`
    likely successors), so loss falls as a model learns it; ids start at `first_id` (0 and 1
    are pad and eos). The first 20-60 % of each example is the prompt (mask 0), the rest the
    completion (mask 1). Returns (input_ids, completion_mask)."""
    rng = random.Random(seed)
    states = min(states, vocab - first_id)
    ids = rng.sample(range(first_id, vocab), states)
    succ = [[rng.randrange(states) for _ in range(branching)] for _ in range(states)]
    seqs, masks = [], []
    for length in lengths:
        state = rng.randrange(states)
        seq = []
        for _ in range(length):
            seq.append(ids[state])
            state = (
                succ[state][rng.randrange(branching)]
                if rng.random() < 0.9
                else rng.randrange(states)
            )
        cut = max(1, min(length - 1, int(length * rng.uniform(*prompt_frac))))
        seqs.append(seq)
        masks.append([0] * cut + [1] * (length - cut))
    return seqs, masks


def fill_ratio(lengths: Sequence[int], max_len: int) -> float:
    """Real tokens / slots when every example is padded to max_len."""
    return sum(lengths) / (len(lengths) * max_len) if lengths else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation between closest ranks."""
    if not values:
        return math.nan
    data = sorted(values)
    if len(data) == 1:
        return float(data[0])
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return float(data[lo] + (data[hi] - data[lo]) * (pos - lo))


def median(values: Sequence[float]) -> float:
    """Median, NaN when empty."""
    return float(statistics.median(values)) if values else math.nan


def spread(values: Sequence[float]) -> float:
    """Half the range: the noise band quoted beside a median."""
    return (max(values) - min(values)) / 2 if values else math.nan
