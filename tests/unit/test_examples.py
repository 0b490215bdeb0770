"""Every FineTuneJob in examples/*.yaml is valid three ways: the CRD's openAPIV3Schema
(jsonschema), the pydantic model (parse_spec), and the CRD's CEL rules; and the operator admits
it under the default platform policy, or under the one its header asks for."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from cel_eval import root_schema, to_json_schema, validate_object
from finetune_operator.admission import admit
from finetune_operator.api import API_VERSION, KIND, parse_spec
from finetune_operator.policy import Policy

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# examples beyond the default platform policy: the policy they need, named in their header
POLICY_NEEDED = {"fsdp-2nodes-8b.yaml": ("FINETUNE_MAX_GPUS_PER_JOB", "16")}


def _jobs() -> list[tuple[str, dict[str, Any]]]:
    jobs = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if isinstance(doc, dict) and doc.get("kind") == KIND:
                name = path.name if i == 0 else f"{path.name}#{i}"
                jobs.append((name, doc))
    return jobs


JOBS = _jobs()
IDS = [name for name, _ in JOBS]


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = to_json_schema(root_schema())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_errors(validator: jsonschema.Draft202012Validator, obj: Any) -> list[str]:
    return [
        "." + ".".join(str(p) for p in e.absolute_path) + f": {e.message}"
        for e in validator.iter_errors(obj)
    ]


def test_there_are_examples() -> None:
    assert "quickstart.yaml" in IDS
    assert len(JOBS) >= 1


@pytest.mark.parametrize(("name", "obj"), JOBS, ids=IDS)
def test_example_header(name: str, obj: dict[str, Any]) -> None:
    assert obj["apiVersion"] == API_VERSION
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"]), name


@pytest.mark.parametrize(("name", "obj"), JOBS, ids=IDS)
def test_example_matches_the_crd_schema(
    name: str, obj: dict[str, Any], validator: jsonschema.Draft202012Validator
) -> None:
    assert schema_errors(validator, obj) == []


@pytest.mark.parametrize(("name", "obj"), JOBS, ids=IDS)
def test_example_parses_with_the_model(name: str, obj: dict[str, Any]) -> None:
    spec = parse_spec(obj["spec"])
    assert spec.model.source == obj["spec"]["model"]["source"]


@pytest.mark.parametrize(("name", "obj"), JOBS, ids=IDS)
def test_example_passes_the_cel_rules(name: str, obj: dict[str, Any]) -> None:
    assert validate_object(obj) == []


@pytest.mark.parametrize(("name", "obj"), JOBS, ids=IDS)
def test_example_survives_the_model_round_trip(name: str, obj: dict[str, Any]) -> None:
    """What the operator would write back (model dump) is still a valid object."""
    wire = parse_spec(obj["spec"]).model_dump(by_alias=True, exclude_none=True, mode="json")
    again = {**obj, "spec": wire}
    assert validate_object(again) == []


@pytest.mark.parametrize(("name", "obj"), JOBS, ids=IDS)
def test_example_can_be_suspended_and_resumed(name: str, obj: dict[str, Any]) -> None:
    toggled = {**obj, "spec": {**obj["spec"], "suspend": not obj["spec"].get("suspend", False)}}
    assert validate_object(obj, obj) == []
    assert validate_object(toggled, obj) == []
    assert validate_object(obj, toggled) == []


# the converted schema is strict enough to catch mistakes (so the checks above can fail)
@pytest.mark.parametrize(
    ("path", "value", "error_at"),
    [
        ("spec.method.type", "lorax", ".spec.method.type"),
        ("spec.model.bogus", 1, ".spec.model"),
        ("spec.training.epochs", 1.5, ".spec.training.epochs"),
        ("spec.dataset.maxSeqLength", 8, ".spec.dataset.maxSeqLength"),
        ("spec.dataset.validation.splitRatio", 0, ".spec.dataset.validation.splitRatio"),
        ("spec.resources.memory", "8GB", ".spec.resources.memory"),
        ("spec.method.lora.targetModules", [], ".spec.method.lora.targetModules"),
        ("spec.suspend", "yes", ".spec.suspend"),
    ],
)
def test_schema_rejects_a_broken_quickstart(
    path: str, value: Any, error_at: str, validator: jsonschema.Draft202012Validator
) -> None:
    obj = copy.deepcopy(dict(JOBS)["quickstart.yaml"])
    node = obj
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    errors = schema_errors(validator, obj)
    assert errors and all(e.startswith(error_at + ": ") for e in errors), errors


def test_schema_requires_the_spec(validator: jsonschema.Draft202012Validator) -> None:
    obj = {k: v for k, v in dict(JOBS)["quickstart.yaml"].items() if k != "spec"}
    assert schema_errors(validator, obj) == [".: 'spec' is a required property"]


@pytest.mark.parametrize(("name", "obj"), JOBS, ids=IDS)
def test_example_is_admitted_by_the_platform_policy(name: str, obj: dict[str, Any]) -> None:
    env = dict([POLICY_NEEDED[name]]) if name in POLICY_NEEDED else {}
    assert admit(obj, Policy.from_env(env)) == []
    if name in POLICY_NEEDED:
        variable, value = POLICY_NEEDED[name]
        assert admit(obj, Policy.from_env({})), f"{name} is within the default policy"
        assert f"{variable}={value}" in (EXAMPLES / name).read_text(), "header must say so"
