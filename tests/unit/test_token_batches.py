"""Batches sized by tokens (`training.batchTokens`): the grouping, the sampler's epochs, the
`auto` rule, the config rules, and a real run on the tiny model (including a resume)."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer import hyper
from finetune_trainer.config import ConfigError, RunConfig, parse_run_config
from finetune_trainer.token_batches import TokenBudgetBatchSampler, token_groups

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data" / "instructions.jsonl"


def test_groups_cover_every_example_once_within_the_budget() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(500)] + [900]  # one longer than the budget
    groups = token_groups(lengths, 512, seed=1)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        assert len(group) == 1 or sum(lengths[i] for i in group) <= 512
    assert [500] in groups  # the overlong example alone
    # a group closes only when the next example would not fit: no two neighbours fit together
    for a, b in itertools.pairwise(groups):
        assert sum(lengths[i] for i in a) + lengths[b[0]] > 512
    assert token_groups(lengths, 512, seed=1) == groups
    assert token_groups(lengths, 512, seed=2) != groups


def test_each_epoch_visits_the_same_groups_in_its_own_seeded_order() -> None:
    lengths = [random.Random(i).randint(10, 200) for i in range(200)]
    sampler = TokenBudgetBatchSampler(lengths, 1000, seed=7)
    first = list(sampler)
    assert len(first) == len(sampler) == len(token_groups(lengths, 1000, 7))
    assert list(sampler) == first  # same epoch, same order: a resume skips the right batches
    sampler.sampler.set_epoch(1)  # where accelerate sets it (also through its shard wrapper)
    second = list(sampler)
    assert second != first and sorted(second) == sorted(first)
    sampler.set_epoch(0)
    assert list(sampler) == first


def _run(batch_tokens: object = "auto", **sections: Any) -> RunConfig:
    doc: dict[str, Any] = {
        "model": {"source": "m"},
        "dataset": {"source": "d"},
        "training": {"batchTokens": batch_tokens},
        "output": {"uri": "o"},
    }
    for key, value in sections.items():
        doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
    return RunConfig.model_validate(doc)


@pytest.mark.parametrize(
    ("run", "device", "attention", "flat", "tokens"),
    [
        (_run(), "cuda", "flex_attention", True, hyper.AUTO_BATCH_TOKENS),
        (_run(), "cuda", "flash_attention_2", True, hyper.AUTO_BATCH_TOKENS),
        (_run(), "cuda", "sdpa", True, None),  # a materialised mask: quadratic in tokens
        (_run(), "cuda", "flex_attention", False, None),  # padded rows
        (_run(), "cpu", None, True, None),  # CPU keeps rows of batchSize
        (_run(training={"batchSize": 8}), "cuda", "flex_attention", True, None),
        (_run(4096), "cpu", None, True, 4096),  # explicit wins
    ],
    ids=["flex", "flash", "sdpa", "padded", "cpu", "explicit-rows", "explicit-tokens"],
)
def test_auto_rule(
    run: RunConfig, device: str, attention: str | None, flat: bool, tokens: int | None
) -> None:
    assert hyper.batch_tokens(run, device, attention=attention, padding_free=flat) == tokens


def test_auto_takes_the_memory_estimate_when_there_is_one() -> None:
    tokens = hyper.batch_tokens(
        _run(), "cuda", attention="flex_attention", padding_free=True, estimate=40_000
    )
    assert tokens == 40_000


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {"training": {"batchTokens": 4096, "batchSize": 8}},
            "spec.training.batchTokens: set batchSize or batchTokens, not both",
        ),
        (
            {
                "task": "sequence-classification",
                "dataset": {"source": "d", "format": "classification"},
                "training": {"batchTokens": 4096},
            },
            "spec.training.batchTokens: only for task causal-lm",
        ),
        (
            {"method": {"type": "prefix"}, "training": {"batchTokens": 4096}},
            "spec.training.batchTokens: prefix tuning trains padded rows",
        ),
        (
            {"dataset": {"source": "d", "paddingFree": False}, "training": {"batchTokens": 4096}},
            "spec.training.batchTokens: needs padding-free batches",
        ),
    ],
)
def test_config_rules_name_the_field(sections: dict[str, Any], message: str) -> None:
    doc: dict[str, Any] = {"model": {"source": "m"}, "dataset": {"source": "d"}}
    doc.update(sections)
    doc["output"] = {"uri": "o"}
    with pytest.raises(ConfigError) as err:
        parse_run_config(doc, prefix="spec")
    assert err.value.errors[0].startswith(message), err.value.errors


def _lm_run(model_dir: Path, out: Path, **training: Any) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {"source": str(model_dir)},
            "dataset": {"source": str(DATA), "format": "alpaca", "maxSeqLength": 256},
            "method": {"type": "lora"},
            "training": {"learningRate": 0.01, "loggingSteps": 1, **training},
            "output": {"uri": str(out)},
        }
    )


def _execute(run: RunConfig) -> Any:
    from finetune_trainer.reporting import run_reported
    from finetune_trainer.runner import RunContext

    return run_reported(run, RunContext(name="t"), progress_port=None)


def test_a_run_steps_by_token_budget(tiny_model_dir: Path, tmp_path: Path) -> None:
    """One epoch of budget batches: as many optimizer steps as token groups, every real
    token trained once."""
    from finetune_trainer.models import LocalModel
    from finetune_trainer.runner import prepare_data
    from finetune_trainer.token_batches import example_lengths

    run = _lm_run(tiny_model_dir, tmp_path / "out", epochs=1, batchTokens=600, saveSteps=1000)
    _, prepared = prepare_data(run, LocalModel(tiny_model_dir))
    lengths = example_lengths(prepared.train)
    groups = token_groups(lengths, 600, seed=run.training.seed)
    assert 1 < len(groups) < len(lengths)
    summary = _execute(run)
    assert summary.outcome.value == "Succeeded", summary.message
    assert summary.steps == len(groups)
    assert summary.trained_tokens == sum(lengths)


def test_a_resumed_token_budget_run_trains_like_an_uninterrupted_one(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Resumed from its step-2 checkpoint, a 4-step run trains steps 3 and 4 on the batches
    the uninterrupted run trained them on: the same per-step losses."""
    import shutil

    straight = tmp_path / "straight"
    run = _lm_run(tiny_model_dir, straight, maxSteps=4, batchTokens=500, saveSteps=2)
    _execute(run)
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-4")  # as if stopped after step 2
    (resumed / "history.jsonl").unlink()
    run = run.model_copy(update={"output": run.output.model_copy(update={"uri": str(resumed)})})
    summary = _execute(run)
    assert summary.steps == 4 and summary.message == "resumed from checkpoint-2"

    def losses(out: Path) -> dict[int, float]:
        lines = (out / "history.jsonl").read_text().splitlines()
        return {h["step"]: h["loss"] for h in map(json.loads, lines) if "loss" in h}

    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert b == pytest.approx(a, rel=1e-5)


def test_the_auto_budget_shrinks_to_what_fits(tiny_model_dir: Path) -> None:
    """probe_batch_tokens tries one padding-free row of maxSeqLength documents and shrinks the
    budget when it runs out of memory (here: a model that does above 1,500 tokens)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tried: list[tuple[int, int]] = []
    forward = model.forward

    def limited(**kwargs: Any) -> Any:
        tokens = kwargs["input_ids"].shape[1]
        tried.append((tokens, int(kwargs["position_ids"].max()) + 1))
        if tokens > 1500:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return forward(**kwargs)

    model.forward = limited
    found = hyper.probe_batch_tokens(model, 2048, seq_len=256)
    assert 1000 < found <= 1500
    assert tried[0] == (2048, 256)  # the budget first, as documents of maxSeqLength
    assert [t for t, _ in tried] == sorted((t for t, _ in tried), reverse=True)
