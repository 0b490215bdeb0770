"""Every example whose data ships in examples/ runs through `finetune run`, with a tiny model
substituted via --set (the cluster-only examples are validated in test_examples.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from finetune_trainer.cli import app
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]
LOCAL_DATA_EXAMPLES = sorted(
    p.name
    for p in (REPO / "examples").glob("*.yaml")
    if str(yaml.safe_load(p.read_text())["spec"]["dataset"].get("source", "")).startswith(
        "examples/"
    )
    and p.name != "quickstart.yaml"  # run for real in test_quickstart.py
)


def test_the_runnable_examples_are_found() -> None:
    assert {"chat-system-prompt.yaml", "classification.yaml", "dora.yaml", "prefix.yaml"} <= set(
        LOCAL_DATA_EXAMPLES
    )


@pytest.mark.parametrize("example", LOCAL_DATA_EXAMPLES)
def test_example_runs_with_a_tiny_model(
    example: str,
    tiny_model_dir: Path,
    minilm_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(REPO)
    spec = yaml.safe_load((REPO / "examples" / example).read_text())["spec"]
    classification = spec.get("task") == "sequence-classification"
    model = minilm_dir if classification else tiny_model_dir
    out = tmp_path / "out"
    args = ["run", f"examples/{example}", "--output", str(out), "--set", f"model.source={model}"]
    for override in ("training.maxSteps=2", "training.batchSize=2"):
        args += ["--set", override]
    if "wandb" in spec.get("tracking", {}):  # no W&B account here: its offline mode
        args += ["--set", "tracking.wandb.mode=offline"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    weights = "model" if spec.get("method", {}).get("type") == "full" else "adapter"
    assert (out / weights).is_dir()
    assert (out / "metrics.json").exists()
    if spec.get("evaluation", {}).get("generation"):
        assert (out / "samples.jsonl").read_text().count("\n") >= 1
