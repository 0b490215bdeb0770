"""DPO and ORPO end to end through the real trainer on the tiny model: progress, checkpoints,
resume, outputs, the reference model, and the preference scores before and after."""

from __future__ import annotations

import contextlib
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
    assert f"objective **{objective}**" in card and "## Preference on held-out pairs" in card
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-2", "checkpoint-4"]
    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").exists()
    assert not (adapter / "ref").exists()  # the reference is the base, not a second adapter
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]


def test_orpo_resumes_from_its_newest_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first, _ = _execute(_run(tiny_model_dir, out, "orpo"))
    assert first.outcome == Outcome.SUCCEEDED, first.message
    second, _ = _execute(_run(tiny_model_dir, out, "orpo", training={"maxSteps": 6}))
    assert second.outcome == Outcome.SUCCEEDED, second.message
    assert second.steps == 6 and second.message == "resumed from checkpoint-4"
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4, 5, 6]


def test_another_objective_on_the_same_output_is_refused(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first, _ = _execute(_run(tiny_model_dir, out, "dpo", training={"maxSteps": 2}))
    assert first.outcome == Outcome.SUCCEEDED, first.message
    second, _ = _execute(_run(tiny_model_dir, out, "orpo", training={"maxSteps": 2}))
    assert second.outcome == Outcome.INVALID_INPUT
    message = second.message or ""
    assert "holds a different run (training.dpo.beta 0.1 -> null" in message


def test_full_dpo_keeps_a_frozen_reference_copy(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = _run(tiny_model_dir, out, "dpo", method={"type": "full"}, training={"learningRate": 1e-3})
    summary, _ = _execute(run)
    assert summary.outcome == Outcome.SUCCEEDED, summary.message
    assert summary.model_uri == f"{out}/model" and summary.adapter_uri is None
    metrics = json.loads((out / "metrics.json").read_text())
    # untuned, the policy is the reference: every implicit DPO reward is 0, no pair preferred
    assert metrics["baseline_eval_reward_margin"] == 0.0
    assert metrics["baseline_eval_reward_accuracy"] == 0.0
    assert metrics["eval_reward_margin"] != 0.0  # trained away from the frozen copy


def test_with_an_adapter_the_reference_is_the_adapter_disabled_base(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch
    from finetune_trainer.data import prepare_dataset
    from finetune_trainer.methods import apply_method, untuned
    from finetune_trainer.preference import build_trainer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = _run(tiny_model_dir, tmp_path / "out", "dpo")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prepared = prepare_dataset(run.dataset, "causal-lm", tokenizer, seed=0, objective="dpo")
    model = apply_method(
        run, AutoModelForCausalLM.from_pretrained(tiny_model_dir), gradient_checkpointing=False
    )
    args = {"output_dir": str(tmp_path / "o"), "report_to": "none", "use_cpu": True}
    trainer = build_trainer(run, model, tokenizer, prepared, args, [])
    assert trainer.ref_model is None and list(model.peft_config) == ["default"]
    with torch.no_grad():  # move the adapter away from its zero start
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.05)
    batch = trainer.data_collator([prepared.eval[i] for i in range(4)])

    def answer_logps(tuned: bool) -> Any:
        ids, mask = batch["input_ids"], batch["completion_mask"]
        with torch.no_grad(), contextlib.nullcontext() if tuned else untuned(model):
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1]
        logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (logps * mask[:, 1:]).sum(-1)

    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, batch)
    reference = torch.cat([ref_chosen, ref_rejected])
    # equal up to the fused LM head's float rounding; the tuned model is far off
    assert (reference - answer_logps(tuned=False)).abs().max() < 1e-2
    assert (reference - answer_logps(tuned=True)).abs().max() > 1.0
