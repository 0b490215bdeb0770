"""The `finetune` console script: run, validate, help, and the plugged-in cluster commands."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import yaml
from finetune_trainer.cli import app
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _job(tmp_path: Path, model_dir: Path, data: Path, **spec: object) -> Path:
    doc = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    doc["spec"]["model"]["source"] = str(model_dir)
    doc["spec"]["dataset"]["source"] = str(data)
    doc["spec"].update(spec)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_console_script_help_lists_local_and_cluster_commands() -> None:
    exe = shutil.which("finetune")
    assert exe, "the finetune console script is installed by scripts/setup.sh"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("run", "validate", "status", "list", "logs", "cancel"):
        assert command in out


def test_run_help_explains_exit_codes() -> None:
    result = runner.invoke(app, ["run", "--help"])
    assert result.exit_code == 0
    assert "--set" in result.output and "75" in result.output


def test_run_with_overrides_writes_outputs(tiny_model_dir: Path, tmp_path: Path) -> None:
    job = _job(tmp_path, tiny_model_dir, REPO / "examples" / "data" / "instructions.jsonl")
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "run",
            str(job),
            "--output",
            str(out),
            "--set",
            "training.maxSteps=2",
            "--set",
            "training.batchSize=4",
            "--set",
            "training.saveSteps=2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Succeeded" in result.output
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    assert (out / "adapter" / "adapter_config.json").exists()


def test_run_invalid_spec_exits_65_naming_the_field(tmp_path: Path, tiny_model_dir: Path) -> None:
    job = _job(
        tmp_path, tiny_model_dir, tmp_path / "x.jsonl", method={"type": "full", "lora": {"r": 4}}
    )
    result = runner.invoke(app, ["run", str(job)])
    assert result.exit_code == 65
    assert "spec.method.lora" in result.output


def test_validate_reports_bad_lines_without_loading_the_model(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "d.jsonl"
    rows = [{"instruction": f"Say {i}", "input": "", "output": f"{i}"} for i in range(30)]
    lines = [json.dumps(r) for r in rows]
    lines[4] = '{"instruction": "broken"'
    lines[9] = json.dumps({"instruction": "x", "input": "", "output": ""})
    data.write_text("\n".join(lines) + "\n")
    # a model directory with only the tokenizer: validate must not need the weights
    tok_only = tmp_path / "tok"
    shutil.copytree(tiny_model_dir, tok_only)
    for weights in tok_only.glob("*.safetensors"):
        weights.unlink()
    result = runner.invoke(app, ["validate", str(_job(tmp_path, tok_only, data))])
    assert result.exit_code == 65, result.output
    assert "d.jsonl:5" in result.output and "d.jsonl:10" in result.output


def test_validate_ok(tiny_model_dir: Path, tmp_path: Path) -> None:
    job = _job(tmp_path, tiny_model_dir, REPO / "examples" / "data" / "instructions.jsonl")
    result = runner.invoke(app, ["validate", str(job)])
    assert result.exit_code == 0, result.output
    assert "dataset OK" in result.output and "alpaca" in result.output


def test_validate_checks_the_generation_eval_prompts(tiny_model_dir: Path, tmp_path: Path) -> None:
    good = _job(
        tmp_path,
        tiny_model_dir,
        REPO / "examples" / "data" / "instructions.jsonl",
        evaluation={"generation": {"examples": 5}},
    )
    result = runner.invoke(app, ["validate", str(good)])
    assert result.exit_code == 0, result.output
    assert "generation eval OK: 5 held-out prompts" in result.output

    notes = tmp_path / "notes.jsonl"
    notes.write_text("".join(json.dumps({"text": f"note {i}"}) + "\n" for i in range(30)))
    doc = yaml.safe_load(good.read_text())
    doc["spec"]["dataset"] = {
        "source": str(notes),
        "format": "auto",
        "validation": {"splitRatio": 0.2},
    }
    good.write_text(yaml.safe_dump(doc))
    result = runner.invoke(app, ["validate", str(good)])
    assert result.exit_code == 65, result.output
    assert "evaluation.generation" in result.output
