"""The README's main job: the quickstart as shipped, on the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from finetune_trainer.cli import app
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 5 minutes on an idle 2-core machine; far more when loaded
def test_quickstart_beats_the_untuned_baseline(
    smollm2_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)  # the manifest's dataset path is relative to the repo root
    out = tmp_path / "quickstart"
    result = CliRunner().invoke(app, ["run", "examples/quickstart.yaml", "--output", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_loss"] < 0.7 * metrics["baseline_eval_loss"]
    assert metrics["steps"] == 38  # 148 training records, batch 8, 2 epochs
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "loss.png").exists() and (out / "README.md").exists()
