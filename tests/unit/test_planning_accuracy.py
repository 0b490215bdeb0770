"""The memory estimator against every GPU measurement (bench/results/h100-*, h200-*: our
trainer and the plain transformers recipe, H100 and H200): the worst-case estimate is never
below a measured peak, and within +30 % of it where the batches reach the worst case (the
arms padded to max length). The residual table in docs/planning.md comes from the same rows
(`python bench/planning_residuals.py`)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


residuals = _load("planning_residuals")
ROWS = residuals.rows()


def test_every_gpu_measurement_is_checked() -> None:
    files = {p.name for p in (BENCH / "results").glob("h[12]00-*.json")}
    assert {r.file for r in ROWS} == files
    assert len(files) >= 7  # 3 H100 (1B) and 4 H200 (8B) runs
    assert sum(r.worst_case_reached for r in ROWS) >= 5


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r.file}:{r.arm}")
def test_the_estimate_is_never_below_the_measured_peak(row: object) -> None:
    assert row.estimated >= row.measured, residuals.table([row])  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "row", [r for r in ROWS if r.worst_case_reached], ids=lambda r: f"{r.file}:{r.arm}"
)
def test_worst_case_runs_are_within_30_percent(row: object) -> None:
    assert row.ratio <= 1.30, residuals.table([row])  # type: ignore[attr-defined]


def test_the_docs_give_these_residuals() -> None:
    docs = (BENCH.parent / "docs" / "planning.md").read_text()
    assert residuals.table(ROWS) in docs


def test_the_throughput_range_covers_the_measured_mfu() -> None:
    """The duration range (MFU_RANGE) spans the warm MFU of the trainer's default path in
    every GPU measurement."""
    from finetune_trainer.planning.gpus import MFU_RANGE

    warm = []
    for path in sorted((BENCH / "results").glob("h[12]00-*.json")):
        doc = json.loads(path.read_text())
        by_arm: dict[str, float] = {}
        for r in doc["results"]:
            if r["arm"] in ("ours", "ours-noliger") and r.get("mfu"):
                by_arm[r["arm"]] = max(by_arm.get(r["arm"], 0.0), r["mfu"])
        warm += by_arm.values()
    assert len(warm) >= 6
    assert MFU_RANGE[0] <= min(warm) and max(warm) <= MFU_RANGE[1]


@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3.1-8b"])
def test_the_benchmark_shapes_count_like_the_meta_model(name: str) -> None:
    from finetune_trainer.config import RunConfig
    from finetune_trainer.planning.facts import model_facts

    bench = _load("benchlib")
    shape = bench.SHAPES[name]
    config = _load("trainer_bench").llama_config(shape, 2048)
    run = RunConfig.model_validate(
        {
            "model": {"source": "m"},
            "dataset": {"source": "d.jsonl"},
            "method": {"type": "lora", "lora": {"r": 16, "targetModules": residuals.LORA_MODULES}},
            "output": {"uri": "o"},
        }
    )
    facts = model_facts(config, run)
    counted = residuals.counts(shape, "lora")
    assert (facts.params.total, facts.params.trainable) == (counted.total, counted.trainable)
    assert facts.params.quantizable == counted.quantizable
