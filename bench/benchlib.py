"""Pure helpers shared by the benchmarks (no torch import): data shapes, statistics; model
shapes and FLOPs come from `finetune_trainer.planning`.

Kept import-light so `tests/unit/test_bench.py` can check them quickly.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence

# The model's shape, FLOPs and GPU peaks live in the trainer package (the planner uses them).
from finetune_trainer.planning.flops import training_flops as training_flops
from finetune_trainer.planning.gpus import PEAK_BF16_FLOPS as PEAK_BF16_FLOPS
from finetune_trainer.planning.gpus import peak_flops as peak_flops
from finetune_trainer.planning.shape import ModelShape as ModelShape

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
