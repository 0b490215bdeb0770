"""Every method x task x option combination the spec accepts runs on a tiny model, and every
one it refuses names the field to change: the spec refuses exactly what the trainer cannot run
(found by running them: prefix/prompt tuning with a classifier, with mixed precision, prefix
tuning with gradient checkpointing)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer.config import ConfigError, parse_run_config
from finetune_trainer.progress import Outcome
from finetune_trainer.reporting import run_reported
from finetune_trainer.runner import RunContext

REPO = Path(__file__).resolve().parents[2]
DATA = {
    "causal-lm": ("alpaca", REPO / "examples" / "data" / "instructions.jsonl"),
    "sequence-classification": (
        "classification",
        REPO / "examples" / "data" / "reviews-sentiment.jsonl",
    ),
}
METHODS = ["full", "lora", "dora", "ia3", "prefix", "prompt"]
OPTIONS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "gradient-checkpointing": {"gradientCheckpointing": True},
    "bf16": {"precision": "bf16"},  # mixed precision (autocast) also on CPU
}
COMBINATIONS = list(itertools.product(METHODS, DATA, OPTIONS))
REFUSED = {
    ("prefix", "sequence-classification"): "spec.method.type",
    ("prompt", "sequence-classification"): "spec.method.type",
    ("prefix", "bf16"): "spec.training.precision",
    ("prompt", "bf16"): "spec.training.precision",
    ("prefix", "gradient-checkpointing"): "spec.training.gradientCheckpointing",
}


def _spec(model_dir: Path, out: Path, method: str, task: str, option: str) -> dict[str, Any]:
    fmt, data = DATA[task]
    return {
        "model": {"source": str(model_dir)},
        "task": task,
        "dataset": {
            "source": str(data),
            "format": fmt,
            "maxSeqLength": 256,
            "validation": {"splitRatio": 0.2},
        },
        "method": {"type": method},
        "training": {"maxSteps": 1, "batchSize": 2, "saveSteps": 1, **OPTIONS[option]},
        "output": {"uri": str(out)},
    }


def _expected_refusal(method: str, task: str, option: str) -> str | None:
    return REFUSED.get((method, task)) or REFUSED.get((method, option))


@pytest.mark.parametrize(
    ("method", "task", "option"), COMBINATIONS, ids=["-".join(c) for c in COMBINATIONS]
)
def test_accepted_combinations_run_and_refused_ones_name_the_field(
    method: str, task: str, option: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    spec = _spec(tiny_model_dir, tmp_path / "out", method, task, option)
    field = _expected_refusal(method, task, option)
    if field is not None:
        with pytest.raises(ConfigError) as err:
            parse_run_config(spec, "spec")
        assert [line.split(": ")[0] for line in err.value.errors] == [field]
        return
    run = parse_run_config(spec, "spec")
    summary = run_reported(run, RunContext(name="combo"), progress_port=None)
    assert summary.outcome == Outcome.SUCCEEDED, summary.message
    assert summary.steps == 1
