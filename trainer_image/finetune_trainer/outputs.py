"""Write the run's artifacts: adapter/ (or model/), merged/, metrics.json, loss.png, the card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune_trainer.config import RunConfig

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"


def weights_dir(run: RunConfig) -> str:
    """Where the trained weights go: model/ for a full fine-tune, else adapter/."""
    return MODEL_DIR if run.method.type == "full" else ADAPTER_DIR


def save_weights(
    run: RunConfig, model: Any, tokenizer: Any, out: Path, state_dict: Any = None
) -> Path:
    """The trained weights and the tokenizer: a PEFT adapter in adapter/, or the whole model
    of a full fine-tune in model/. `state_dict`: the weights gathered from the shards of an
    FSDP run (the model's own parameters otherwise)."""
    path = out / weights_dir(run)
    model.save_pretrained(path, state_dict=state_dict)
    tokenizer.save_pretrained(path)
    return path


def save_merged(model: Any, tokenizer: Any, out: Path) -> Path:
    """Base + adapter merged into plain weights (loadable by vLLM and transformers alone)."""
    path = out / "merged"
    merged = model.merge_and_unload()
    merged.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_metrics(metrics: dict[str, Any], out: Path) -> Path:
    """metrics.json, sorted keys."""
    path = out / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return path


def plot_loss(history_path: Path, out: Path) -> Path | None:
    """loss.png: train and eval loss against the step."""
    if not history_path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train: list[tuple[int, float]] = []
    evals: list[tuple[int, float]] = []
    for line in history_path.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            train.append((rec["step"], rec["loss"]))
        if "eval_loss" in rec:
            evals.append((rec["step"], rec["eval_loss"]))
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="#1f77b4")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", color="#d62728")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "loss.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(value: Any) -> str:
    return (
        f"{value:.4f}"
        if isinstance(value, float)
        else f"{value:,}"
        if isinstance(value, int)
        else str(value)
    )


def _objective(run: RunConfig) -> str:
    """', objective dpo (beta 0.1, sigmoid loss)' for a preference run, else ''."""
    t = run.training
    if t.dpo is not None:
        return f", objective **dpo** (beta {t.dpo.beta}, {t.dpo.loss_type} loss)"
    if t.orpo is not None:
        return f", objective **orpo** (lambda {t.orpo.lambda_})"
    return ""


def _preference_section(metrics: dict[str, Any]) -> list[str]:
    """Held-out pairs ranked before and after training, when the run measured them."""
    if "preference_accuracy" not in metrics:
        return []
    rows = [
        ("preference accuracy", "preference_accuracy"),
        ("preference margin (nats/token)", "preference_margin"),
    ]
    return [
        "## Preference on held-out pairs",
        "",
        f"{int(metrics.get('preference_pairs', 0))} pairs; the model prefers an answer when its "
        "mean log-probability per token is higher.",
        "",
        "| | before | after |",
        "|---|---|---|",
        *(
            f"| {title} | {_fmt(metrics.get('baseline_' + key))} | {_fmt(metrics[key])} |"
            for title, key in rows
        ),
        "",
    ]


def write_model_card(
    run: RunConfig, metrics: dict[str, Any], data_stats: dict[str, Any], out: Path, name: str
) -> Path:
    """README.md: base model, method, data, metrics and how to load the result."""
    method = run.method.type
    is_adapter = weights_dir(run) == ADAPTER_DIR
    if run.task == "sequence-classification":
        auto = "AutoModelForSequenceClassification"
    else:
        auto = "AutoModelForCausalLM"
    load = (
        f"from peft import PeftModel\nfrom transformers import {auto}\n\n"
        f'base = {auto}.from_pretrained("<base model>")\n'
        f'model = PeftModel.from_pretrained(base, "adapter")'
        if is_adapter
        else f'from transformers import {auto}\n\nmodel = {auto}.from_pretrained("{MODEL_DIR}")'
    )
    lines = [
        f"# {name}",
        "",
        f"Fine-tuned from `{run.model.source}` with **{method}** ({run.task}{_objective(run)}).",
        "",
        *_preference_section(metrics),
        "## Training data",
        "",
        "| | |",
        "|---|---|",
        f"| source | `{run.dataset.source or 'inline'}` |",
        *(f"| {k} | {_fmt(v)} |" for k, v in sorted(data_stats.items())),
        "",
        "## Metrics",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items())),
        "",
        "## Configuration",
        "",
        "```json",
        run.model_dump_json(by_alias=True, exclude_none=True, indent=2),
        "```",
        "",
        "## How to load",
        "",
        "```python",
        load,
        "```",
        "",
        "![loss](loss.png)",
        "",
    ]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path
