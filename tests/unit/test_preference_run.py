"""DPO and ORPO end to end through the real trainer on the tiny model: progress, checkpoints,
resume, outputs, the reference model, and the preference scores before and after."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer.config import RunConfig
from finetune_trainer.progress import Outcome, Phase
from finetune_trainer.reporting import run_reported
from finetune_trainer.runner import RunContext

REPO = Path(__file__).resolve().parents[2]
PAIRS = REPO / "examples" / "data" / "preferences.jsonl"


def _run(model_dir: Path, out: Path, objective: str, **overrides: Any) -> RunConfig:
    doc: dict[str, Any] = {
        "model": {"source": str(model_dir)},
        "dataset": {"source": str(PAIRS), "maxSeqLength": 128, "validation": {"splitRatio": 0.1}},
        "method": {"type": "lora"},
        "training": {
            "objective": objective,
            "maxSteps": 4,
            "batchSize": 4,
            "learningRate": 0.01,
            "saveSteps": 2,
            "loggingSteps": 1,
        },
        "output": {"uri": str(out)},
    }
    for key, value in overrides.items():
        doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
    return RunConfig.model_validate(doc)


def _execute(run: RunConfig) -> tuple[Any, list[Phase]]:
    ctx = RunContext(name="t")
    phases: list[Phase] = []
    ctx.tracker.subscribe(lambda p: phases.append(p.phase))
    return run_reported(run, ctx, progress_port=None), phases


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_preference_objective_trains_end_to_end(
    objective: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    summary, phases = _execute(_run(tiny_model_dir, out, objective))
    assert summary.outcome == Outcome.SUCCEEDED, summary.message
    assert summary.steps == 4 and summary.trained_tokens > 0
    for phase in (Phase.VALIDATING_DATA, Phase.TRAINING, Phase.EVALUATING, Phase.SAVING):
        assert phase in phases
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("preference_accuracy", "preference_margin"):
        assert 0 <= metrics[key] <= 1 if key.endswith("accuracy") else True
        assert key in metrics and f"baseline_{key}" in metrics
        assert key in summary.metrics and f"baseline_{key}" in summary.metrics
    assert metrics["preference_pairs"] == 19
    assert {"eval_loss", "baseline_eval_loss", "eval_reward_accuracy", "eval_reward_margin"} <= (
        metrics.keys()
    )
    assert "eval_perplexity" not in metrics  # a preference loss is no language-model loss
    card = (out / "README.md").read_text()
    assert "preference_accuracy" in card and objective in card
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-2", "checkpoint-4"]
    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").exists()
    assert not (adapter / "ref").exists()  # the reference is the base, not a second adapter
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]
