"""`finetune plan` answers for every example (table and JSON): local and packaged models read
in place, hub models from their config.json alone (a hub cache holding nothing else, offline),
an object-store model from its config.json (moto)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_trainer.cli import app
from planning_fixtures import hub_cache_with_configs
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p.name for p in (REPO / "examples").glob("*.yaml"))
S3_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"  # what examples/s3.yaml's model directory holds


@pytest.fixture
def offline_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moto_endpoint: str
) -> dict[str, Any]:
    """Hub configs in an offline cache; the s3 example's model directory (config.json only)
    on the moto server; a platform that allows the 16-GPU example."""
    import s3fs

    configs = hub_cache_with_configs(tmp_path / "hub", monkeypatch)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("FINETUNE_S3_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("FINETUNE_MAX_GPUS_PER_JOB", "64")
    fs = s3fs.S3FileSystem(endpoint_url=moto_endpoint)
    if not fs.exists("ml-models"):
        fs.mkdir("ml-models")
    fs.pipe(
        "ml-models/base/qwen2.5-1.5b-instruct/config.json",
        json.dumps(configs[S3_MODEL]).encode(),
    )
    monkeypatch.chdir(REPO)
    return configs


def _spec(example: str) -> dict[str, Any]:
    return dict(yaml.safe_load((REPO / "examples" / example).read_text())["spec"])


@pytest.mark.parametrize("example", EXAMPLES)
def test_plan_answers_for_every_example(example: str, offline_models: dict[str, Any]) -> None:
    spec = _spec(example)
    result = CliRunner().invoke(app, ["plan", f"examples/{example}", "--output", "json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["model"]["totalParams"] > plan["model"]["trainableParams"] > 0 or (
        spec.get("method", {}).get("type") == "full"
    )
    assert plan["run"]["method"] == spec.get("method", {}).get("type", "lora")
    memory = plan["memory"]
    assert memory["peakGiBPerGpu"] > memory["allocatedGiB"] > 0
    assert memory["worstCaseTokens"] >= 1
    assert sum(memory["breakdownGiB"].values()) == pytest.approx(memory["peakGiBPerGpu"], 0.01)
    resources = spec.get("resources", {})
    assert plan["target"]["worldSize"] == max(resources.get("gpus", 1), 1) * resources.get(
        "nodes", 1
    )
    source = spec["model"]["source"]
    if source.startswith("hf://"):
        config = offline_models[source.removeprefix("hf://")]
        assert plan["model"]["layers"] == config["num_hidden_layers"]
        assert plan["model"]["hidden"] == config["hidden_size"]
    if str(spec["dataset"].get("source", "")).startswith("examples/"):
        assert plan["data"]["examples"] > 0  # exact, or approximated for a hub model
        assert plan["time"]["steps"] > 0
        if source.startswith("hf://"):
            assert any("dataset approximated" in note for note in plan["notes"])
    if resources.get("gpus", 1) > 0:
        assert memory["fits"] in (True, False)
        assert plan["advice"]["options"], plan["advice"]
        assert plan["advice"]["smallest"] is not None
    table = CliRunner().invoke(app, ["plan", f"examples/{example}"], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    assert "peak per GPU" in table.stdout
    assert f"{memory['peakGiBPerGpu']} GiB" in table.stdout
    assert "memory per GPU (GiB)" in table.stdout


def test_plan_with_a_gpu_type_and_price_gives_time_and_cost(
    offline_models: dict[str, Any],
) -> None:
    result = CliRunner().invoke(
        app,
        [
            "plan",
            "examples/quickstart.yaml",
            "--set",
            "training.maxSteps=100",
            "--gpu-type",
            "L4",
            "--price-per-gpu-hour",
            "0.8",
            "-o",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    time = plan["time"]
    assert time["steps"] == 100
    low, high = time["gpuHours"]
    assert 0 < low < high
    assert time["cost"] == pytest.approx([low * 0.8, high * 0.8], rel=0.01)


def test_plan_refuses_bad_options(offline_models: dict[str, Any]) -> None:
    bad_type = CliRunner().invoke(app, ["plan", "examples/quickstart.yaml", "--gpu-type", "X9"])
    assert bad_type.exit_code == 2
    assert "not a known GPU type" in bad_type.output
    bad_memory = CliRunner().invoke(
        app, ["plan", "examples/quickstart.yaml", "--gpu-memory", "much"]
    )
    assert bad_memory.exit_code == 2
    assert "not a memory size" in bad_memory.output
