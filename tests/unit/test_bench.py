"""Smoke tests of the benchmarks' pure parts (bench/benchlib.py) and the padding-free switch."""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


benchlib = _load("benchlib")


def test_lengths_are_seeded_long_tailed_and_bounded() -> None:
    a = benchlib.sample_lengths(2000, 512, seed=1)
    assert a == benchlib.sample_lengths(2000, 512, seed=1)
    assert a != benchlib.sample_lengths(2000, 512, seed=2)
    assert min(a) >= 16 and max(a) == 512
    median = sorted(a)[len(a) // 2]
    assert 40 <= median <= 90  # about 0.12 * 512: most examples short
    at_max = sum(1 for x in a if x == 512) / len(a)
    assert 0.04 <= at_max <= 0.09  # 5 % truncated long documents plus the log-normal tail
    assert 0.15 <= benchlib.fill_ratio(a, 512) <= 0.35


def test_markov_examples_shape_masks_and_vocabulary() -> None:
    lengths = [16, 40, 100]
    ids, masks = benchlib.markov_examples(lengths, vocab=512, seed=0)
    assert [len(s) for s in ids] == lengths == [len(m) for m in masks]
    for seq, mask in zip(ids, masks, strict=True):
        assert all(2 <= t < 512 for t in seq)  # 0 and 1 are pad and eos
        assert mask[0] == 0 and mask[-1] == 1 and sorted(mask) == mask  # prompt, then completion
    assert benchlib.markov_examples(lengths, 512, 0) == (ids, masks)


def test_llama_shapes_match_published_parameter_counts() -> None:
    assert abs(benchlib.SHAPES["llama-3.2-1b"].total_params() - 1.236e9) < 0.01e9
    assert abs(benchlib.SHAPES["llama-3.1-8b"].total_params() - 8.03e9) < 0.01e9
    assert abs(benchlib.SHAPES["smollm2-135m"].total_params() - 134.5e6) < 1e6
    # LoRA r=16 on q/k/v/o of Llama-3.1-8B: 13.6M trainable parameters (peft's count)
    lora = benchlib.SHAPES["llama-3.1-8b"].lora_params(16, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert lora == 13_631_488


def test_flop_formula() -> None:
    shape = benchlib.SHAPES["llama-3.1-8b"]
    n = shape.linear_params()
    attn = shape.heads * shape.dim_head
    # full: 6N per token plus 3 * 2 * layers * d_attn * s^2 per sequence
    full = benchlib.training_flops(shape, [100, 200], "full", 0)
    assert full == 6 * n * 300 + 6 * shape.layers * attn * (100**2 + 200**2)
    # frozen base: 4N per token plus 6 per trainable adapter parameter
    lora = benchlib.training_flops(shape, [100], "lora", 1000)
    assert lora == (4 * n + 6000) * 100 + 6 * shape.layers * attn * 100**2
    assert benchlib.peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert benchlib.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert benchlib.peak_flops("Quadro") is None


def test_statistics() -> None:
    assert benchlib.percentile([1, 2, 3, 4, 5], 50) == 3
    assert benchlib.percentile([1, 2], 99) == pytest.approx(1.99)
    assert math.isnan(benchlib.percentile([], 50))
    assert benchlib.median([3.0, 1.0, 2.0]) == 2.0
    assert benchlib.spread([1.0, 3.0]) == 1.0


def test_padding_free_batches_give_the_padded_loss(tiny_model_dir: Path) -> None:
    """The default padding-free collation (one row, position_ids, SDPA block mask) computes the
    same per-example attention as padded batches: the training loss matches."""
    import torch
    from finetune_trainer.config import RunConfig
    from finetune_trainer.runner import padding_free
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    run = RunConfig.model_validate(
        {"model": {"source": "m"}, "dataset": {"source": "d"}, "output": {"uri": "o"}}
    )
    assert padding_free(run)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    model.config.use_cache = False  # as the Trainer sets it
    ids, masks = benchlib.markov_examples([7, 19, 12], model.config.vocab_size, seed=3)
    examples: list[dict[str, Any]] = [
        {"input_ids": i, "completion_mask": m} for i, m in zip(ids, masks, strict=True)
    ]
    losses = []
    for flat in (True, False):
        collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=flat)
        batch = collate(examples)
        assert ("position_ids" in batch) == flat and batch["input_ids"].shape[0] == (
            1 if flat else 3
        )
        batch.pop("completion_mask", None)
        with torch.no_grad():
            losses.append(float(model(**batch, use_cache=False).loss))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_attention_memory_rows_and_growth() -> None:
    attention_memory = _load("attention_memory")
    ids, positions = attention_memory._row(3000, seed=1)
    assert len(ids) == len(positions) == 3000
    starts = [i for i, p in enumerate(positions) if p == 0]
    assert starts[0] == 0 and len(starts) > 3  # several documents, positions restart in each
    assert all(b - a <= 2048 for a, b in itertools.pairwise(starts))
    linear = attention_memory.growth({"1000": 10, "2000": 20, "4000": 40})
    quadratic = attention_memory.growth({"1000": 10, "2000": 40, "4000": 160})
    assert linear["exponent"] == pytest.approx(1.0) and linear["4000/2000"] == 2.0
    assert quadratic["exponent"] == pytest.approx(2.0)


def test_trainer_bench_runs_every_cpu_arm_on_the_tiny_shape(tmp_path: Path) -> None:
    """A smoke run of bench/trainer_bench.py on CPU: each arm (our path, our defaults and a
    token budget, the plain recipe and the expert TRL recipe) trains and is evaluated."""
    import json

    trainer_bench = _load("trainer_bench")
    out = tmp_path / "bench.json"
    arms = ["ours", "ours-defaults", "ours-tokens", "baseline", "trl-expert"]
    argv = ["--device", "cpu", "--model", "tiny", "--seq", "64", "--batch", "4", "--steps", "3"]
    argv += ["--rounds", "1", "--warmup-steps", "0", "--warmup", "1", "--eval-examples", "4"]
    argv += ["--batch-tokens", "256", "--arms", ",".join(arms), "--out", str(out)]
    assert trainer_bench.main(argv) == 0
    summary = json.loads(out.read_text())["summary"]
    assert list(summary) == arms
    for arm in arms:
        assert "error" not in summary[arm], (arm, summary[arm])
        assert summary[arm]["tokens_per_s"] > 0 and math.isfinite(summary[arm]["eval_loss"])
    # the token budget packs more examples into a step than 4 rows of this data
    assert summary["ours-tokens"]["real_tokens_per_step"] > summary["ours"]["real_tokens_per_step"]
