"""The trainer end to end on tiny real models: each method trains and leaves loadable artifacts."""

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
DATA = REPO / "examples" / "data" / "instructions.jsonl"


def _run(model_dir: Path, out: Path, **overrides: Any) -> RunConfig:
    doc: dict[str, Any] = {
        "model": {"source": str(model_dir)},
        "dataset": {
            "source": str(DATA),
            "format": "alpaca",
            "maxSeqLength": 256,
            "validation": {"splitRatio": 0.1},
        },
        "method": {"type": "lora"},
        "training": {
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


def _execute(run: RunConfig, name: str = "t") -> Any:
    ctx = RunContext(name=name)
    phases: list[Phase] = []
    ctx.tracker.subscribe(lambda p: phases.append(p.phase))
    summary = run_reported(run, ctx, progress_port=None)
    return summary, phases, ctx


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prefix", "prompt", "full"])
def test_method_trains_and_writes_loadable_artifacts(
    method: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    summary, phases, _ = _execute(_run(tiny_model_dir, out, method={"type": method}))
    assert summary.outcome == Outcome.SUCCEEDED, summary.message
    assert summary.steps == 4
    weights = "model" if method == "full" else "adapter"  # a full fine-tune is no adapter
    assert (summary.model_uri, summary.adapter_uri) == (
        (f"{out}/model", None) if method == "full" else (None, f"{out}/adapter")
    )
    assert not (out / ("adapter" if method == "full" else "model")).exists()
    for phase in (Phase.VALIDATING_DATA, Phase.LOADING_MODEL, Phase.TRAINING, Phase.SAVING):
        assert phase in phases
    assert phases[-1] == Phase.SUCCEEDED

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4
    assert metrics["trained_tokens"] > 0
    # the estimate follows maxSteps (4 steps, a fraction of an epoch), not `epochs: auto` (3)
    assert 0.5 < metrics["estimated_trained_tokens"] / metrics["trained_tokens"] < 2
    assert 0 < metrics["trainable_params"] <= metrics["total_params"]
    assert {"eval_loss", "baseline_eval_loss", "eval_perplexity", "train_loss"} <= metrics.keys()
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert "eval_perplexity" in metrics and "baseline_eval_perplexity" in metrics
    assert "epoch" not in metrics and not any(k.endswith("_runtime") for k in metrics)
    assert not any("model_preparation_time" in k for k in metrics)
    card = (out / "README.md").read_text()
    assert method in card and "How to load" in card and f'"{weights}")' in card
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert any("loss" in h for h in history) and any("eval_loss" in h for h in history)
    # checkpoints: complete ones only, rotated to saveTotalLimit (3) at most
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-2", "checkpoint-4"]
    assert all((out / "checkpoints" / c / ".finetune-complete.json").exists() for c in ckpts)

    ids = torch.tensor([[5, 6, 7, 8]])
    if method == "full":
        model = AutoModelForCausalLM.from_pretrained(out / "model")
    else:
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model = PeftModel.from_pretrained(base, out / "adapter")
    assert model(input_ids=ids).logits.shape[-1] > 0


def test_merge_adapter_writes_plain_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    summary, _, _ = _execute(_run(tiny_model_dir, out, output={"mergeAdapter": True}))
    assert summary.outcome == Outcome.SUCCEEDED, summary.message
    assert summary.merged_model_uri == f"{out}/merged"
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_missing_target_module_lists_the_models_linear_layers(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    run = _run(
        tiny_model_dir, tmp_path / "o", method={"type": "lora", "lora": {"targetModules": ["qkv"]}}
    )
    summary, _, _ = _execute(run)
    assert summary.outcome == Outcome.INVALID_INPUT
    assert "method.lora.targetModules: qkv not in this model" in (summary.message or "")
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in (summary.message or "")


def test_missing_model_is_invalid_input(tmp_path: Path) -> None:
    summary, _, _ = _execute(_run(tmp_path / "nope", tmp_path / "o"))
    assert summary.outcome == Outcome.INVALID_INPUT
    assert "model.source" in (summary.message or "")


def test_resume_from_newest_complete_checkpoint_reaches_same_step_count(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first, _, _ = _execute(_run(tiny_model_dir, out, training={"maxSteps": 4, "saveSteps": 2}))
    assert first.outcome == Outcome.SUCCEEDED
    # simulate a run killed mid-save: a newer checkpoint without its completion marker
    half = out / "checkpoints" / "checkpoint-6"
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"partial")
    second, _, _ = _execute(_run(tiny_model_dir, out, training={"maxSteps": 6, "saveSteps": 2}))
    assert second.outcome == Outcome.SUCCEEDED, second.message
    assert second.steps == 6
    assert (
        out / "checkpoints" / "checkpoint-6" / "adapter_model.safetensors"
    ).read_bytes() != b"partial"
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    steps_logged = [h["step"] for h in history if "loss" in h]
    assert steps_logged.count(5) == 1 and 3 in steps_logged  # resumed after 4, not from 0


@pytest.mark.parametrize("method", ["lora", "prefix", "full"])
def test_rerun_of_a_finished_run_reports_the_whole_runs_train_loss(
    method: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Running the same manifest again resumes at the last checkpoint and trains nothing: no
    step past maxSteps (transformers alone takes one when resuming mid-epoch), the adapter is
    the trained one, and train_loss is still the run's (transformers alone reports 0.0)."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    weights_file = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    adapter = out / ("model" if method == "full" else "adapter") / weights_file
    run = _run(
        tiny_model_dir, out, method={"type": method}, training={"maxSteps": 4, "saveSteps": 2}
    )
    first, _, _ = _execute(run)
    assert first.outcome == Outcome.SUCCEEDED
    trained = json.loads((out / "metrics.json").read_text())["train_loss"]
    weights = load_file(adapter)
    second, _, _ = _execute(run)
    assert second.outcome == Outcome.SUCCEEDED and second.steps == 4
    again = json.loads((out / "metrics.json").read_text())["train_loss"]
    assert again > 0
    assert again == pytest.approx(trained, rel=1e-6)
    rewritten = load_file(adapter)
    assert rewritten.keys() == weights.keys()
    assert all((rewritten[k] == weights[k]).all() for k in weights)


def test_logged_train_loss_weights_each_window_by_its_steps() -> None:
    from finetune_trainer.runner import logged_train_loss

    history = [
        {"loss": 2.0, "step": 1},
        {"eval_loss": 9.0, "step": 1},
        {"loss": 1.0, "step": 4},
        {"train_loss": 0.0, "step": 4},
    ]
    assert logged_train_loss(history) == pytest.approx((2.0 * 1 + 1.0 * 3) / 4)
    assert logged_train_loss([{"eval_loss": 1.0, "step": 2}]) is None


def test_generation_eval_scores_the_untuned_and_tuned_answers(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run = _run(tiny_model_dir, out, evaluation={"generation": {"examples": 5, "maxNewTokens": 6}})
    summary, phases, _ = _execute(run)
    assert summary.outcome == Outcome.SUCCEEDED, summary.message
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["generation_examples"] == 5
    for key in ("generation_rouge_l", "baseline_generation_rouge_l"):
        assert 0.0 <= metrics[key] <= 1.0
        assert summary.metrics[key] == metrics[key]
    for key in ("generation_bleu", "baseline_generation_bleu"):
        assert 0.0 <= metrics[key] <= 100.0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    assert all(set(r) == {"prompt", "reference", "answer", "baseline_answer"} for r in rows)
    assert all(r["reference"] and r["prompt"] for r in rows)
    assert phases.count(Phase.EVALUATING) >= 2


def test_generation_eval_on_text_data_is_invalid_input(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "notes.jsonl"
    data.write_text("".join(json.dumps({"text": f"note number {i}"}) + "\n" for i in range(20)))
    run = _run(
        tiny_model_dir,
        tmp_path / "out",
        dataset={"source": str(data), "format": "auto"},
        evaluation={"generation": {"examples": 3}},
    )
    summary, phases, _ = _execute(run)
    assert summary.outcome == Outcome.INVALID_INPUT
    assert "evaluation.generation" in (summary.message or "")
    assert Phase.LOADING_MODEL not in phases  # found with the data, before any GPU is used


def test_classification_with_minilm(minilm_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "reviews.jsonl"
    good = ["a wonderful, moving film", "great acting and a clever plot", "loved every minute"]
    bad = ["a dull, lifeless mess", "terrible script and wooden acting", "boring from start to end"]
    rows = [{"text": f"{t} ({i})", "label": "fresh"} for i in range(10) for t in good]
    rows += [{"text": f"{t} ({i})", "label": "rotten"} for i in range(10) for t in bad]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = RunConfig.model_validate(
        {
            "model": {"source": str(minilm_dir)},
            "task": "sequence-classification",
            "dataset": {
                "source": str(data),
                "format": "classification",
                "maxSeqLength": 64,
                "validation": {"splitRatio": 0.2},
            },
            "method": {"type": "lora", "lora": {"r": 8, "targetModules": ["query", "value"]}},
            "training": {"maxSteps": 6, "batchSize": 8, "learningRate": 0.005, "saveSteps": 3},
            "output": {"uri": str(tmp_path / "out")},
        }
    )
    summary, _, _ = _execute(run)
    assert summary.outcome == Outcome.SUCCEEDED, summary.message
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"


def test_eval_steps_early_stopping_best_checkpoint_and_test_split(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run = _run(
        tiny_model_dir,
        out,
        dataset={"validation": {"splitRatio": 0.1}, "test": {"splitRatio": 0.1}},
        training={
            "maxSteps": 8,
            "saveSteps": 2,
            "evalSteps": 2,
            "saveTotalLimit": 1,
            "earlyStopping": {"patience": 2},
        },
    )
    summary, _, ctx = _execute(run)
    assert summary.outcome == Outcome.SUCCEEDED, summary.message
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"test_loss", "test_perplexity", "eval_loss"} <= metrics.keys()
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    eval_steps = [h["step"] for h in history if "eval_loss" in h and h["step"] > 0]
    assert eval_steps[:2] == [2, 4]  # evaluated every 2 steps
    checkpoints = ctx.tracker.snapshot().checkpoints
    assert all(c.eval_loss is not None for c in checkpoints)
    best = [c for c in checkpoints if c.best]
    assert len(best) == 1
    assert best[0].eval_loss == min(c.eval_loss or 0.0 for c in checkpoints)
    # saveTotalLimit 1 keeps the newest and never rotates the best away
    kept = {int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*")}
    assert best[0].step in kept and len(kept) <= 2
