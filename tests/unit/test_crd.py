"""The generated CRD: up to date, valid for apiextensions.k8s.io/v1, structural, well named."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cel_eval import load_crd, root_schema, walk_schema
from finetune_operator import crd as gen
from finetune_operator.api import CATEGORIES, FineTuneJobStatus

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMITTED = REPO_ROOT / "crds" / "finetune.dev_finetunejobs.yaml"
HELM_COPY = REPO_ROOT / "helm" / "finetune-operator" / "crds" / "finetune.dev_finetunejobs.yaml"


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return load_crd(COMMITTED)


@pytest.fixture(scope="module")
def version(crd: dict[str, Any]) -> dict[str, Any]:
    (only,) = crd["spec"]["versions"]
    out: dict[str, Any] = only
    return out


# --------------------------------------------------------------------------------------------
# committed == generated
# --------------------------------------------------------------------------------------------
def test_generator_paths_are_the_committed_files() -> None:
    assert tuple(p.resolve() for p in gen.CRD_PATHS) == (COMMITTED.resolve(), HELM_COPY.resolve())


def test_committed_crd_is_the_generated_one() -> None:
    assert COMMITTED.read_text() == gen.render_crd()


def test_helm_copy_is_identical() -> None:
    assert HELM_COPY.read_bytes() == COMMITTED.read_bytes()


def test_check_command_passes_on_the_tree() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "finetune_operator.crd", "--check"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0, done.stderr


def test_stdout_prints_the_committed_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert gen.main(["--stdout"]) == 0
    assert capsys.readouterr().out == COMMITTED.read_text()


@pytest.fixture
def tmp_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    first, second = tmp_path / "crds" / "crd.yaml", tmp_path / "helm" / "crd.yaml"
    for path in (first, second):
        path.parent.mkdir()
        path.write_text(COMMITTED.read_text())
    monkeypatch.setattr(gen, "CRD_PATHS", (first, second))
    monkeypatch.setattr(gen, "REPO_ROOT", tmp_path)
    return first, second


def test_check_fails_on_a_tampered_copy(
    tmp_copies: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = tmp_copies
    assert gen.main(["--check"]) == 0
    second.write_text(second.read_text().replace("shortNames:\n    - ftj", "shortNames:\n    - fj"))
    assert gen.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "out of date" in err
    assert "- ftj" in err  # the diff is shown
    assert second.read_text() != first.read_text()  # --check never writes


def test_check_fails_on_a_missing_copy(tmp_copies: tuple[Path, Path]) -> None:
    tmp_copies[0].unlink()
    assert gen.main(["--check"]) == 1


def test_write_mode_repairs_the_copies(tmp_copies: tuple[Path, Path]) -> None:
    first, second = tmp_copies
    first.write_text("stale")
    second.unlink()
    assert gen.main([]) == 0
    assert first.read_text() == second.read_text() == COMMITTED.read_text()
    assert gen.main(["--check"]) == 0


# --------------------------------------------------------------------------------------------
# a valid apiextensions.k8s.io/v1 object
# --------------------------------------------------------------------------------------------
def test_kubernetes_validate_strict(crd: dict[str, Any]) -> None:
    kubernetes_validate.validate(crd, kubernetes_validate.latest_version(), strict=True)


def test_kubernetes_validate_catches_a_bad_schema_key(crd: dict[str, Any]) -> None:
    """The check above can fail: an unknown schema keyword is refused in strict mode."""
    broken = yaml.safe_load(yaml.safe_dump(crd))
    spec = broken["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["properties"]["model"]["oneOfx"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_names_scope_and_version(crd: dict[str, Any], version: dict[str, Any]) -> None:
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == "finetunejobs.finetune.dev"
    names = crd["spec"]["names"]
    assert names["kind"] == "FineTuneJob"
    assert names["plural"] == "finetunejobs"
    assert names["singular"] == "finetunejob"
    assert names["shortNames"] == ["ftj"]
    assert "finetune" in names["categories"] == CATEGORIES
    assert crd["spec"]["group"] == "finetune.dev"
    assert crd["spec"]["scope"] == "Namespaced"
    assert version["name"] == "v1alpha1"
    assert version["served"] is True
    assert version["storage"] is True
    assert version["subresources"] == {"status": {}}


# --------------------------------------------------------------------------------------------
# structural schema
# --------------------------------------------------------------------------------------------
ALL_NODES = walk_schema(root_schema(load_crd(COMMITTED)))
NODE_IDS = [path or "<root>" for path, _ in ALL_NODES]
FORMATS = {
    "bsonobjectid", "uri", "email", "hostname", "ipv4", "ipv6", "cidr", "mac", "uuid", "uuid3",
    "uuid4", "uuid5", "isbn", "isbn10", "isbn13", "creditcard", "ssn", "hexcolor", "rgbcolor",
    "byte", "password", "date", "duration", "datetime", "date-time", "int32", "int64", "float",
    "double",
}  # fmt: skip


def test_every_node_is_visited() -> None:
    paths = {p for p, _ in ALL_NODES}
    assert {".spec.model.source", ".spec.method.lora.targetModules[*]", ".status.phase"} <= paths
    assert ".spec.resources.nodeSelector{*}" in paths
    assert len(ALL_NODES) > 100


@pytest.mark.parametrize(("path", "node"), ALL_NODES, ids=NODE_IDS)
def test_node_is_structural(path: str, node: dict[str, Any]) -> None:
    free = node.get("x-kubernetes-int-or-string") or node.get(
        "x-kubernetes-preserve-unknown-fields"
    )
    assert "type" in node or free, f"{path} has no type"
    assert node.get("type") in (None, "object", "array", "string", "integer", "number", "boolean")
    assert "$ref" not in node and "$defs" not in node and "definitions" not in node
    for combinator in ("anyOf", "oneOf", "allOf", "not"):
        for branch in node.get(combinator, []) if combinator != "not" else [node.get("not", {})]:
            forbidden = {"type", "description", "default", "additionalProperties", "nullable"}
            assert not forbidden & set(branch), (
                f"{path}.{combinator} carries {forbidden & set(branch)}"
            )
    assert not ("properties" in node and "additionalProperties" in node), path
    assert node.get("additionalProperties") is not False, path
    assert isinstance(node.get("items", {}), dict), f"{path}: items must be one schema"
    if node.get("type") == "array":
        assert isinstance(node.get("items"), dict), f"{path}: arrays need items"
    if node.get("x-kubernetes-int-or-string"):
        assert "type" not in node, path
    for flag in ("x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields"):
        assert node.get(flag, True) is True, f"{path}: {flag} should be true or absent"
    if "format" in node:
        assert node["format"] in FORMATS, f"{path}: unknown format {node['format']}"
    for name in node.get("required", []):
        assert name in node.get("properties", {}), f"{path}: required {name} is not a property"
    for value in node.get("enum", []):
        expected = {"string": str, "integer": int, "number": (int, float), "boolean": bool}
        assert isinstance(value, expected.get(node.get("type", ""), object)), path
    assert "default" not in node or node.get("type") is not None


@pytest.mark.parametrize(("path", "node"), ALL_NODES, ids=NODE_IDS)
def test_no_cel_rule_on_an_untyped_node(path: str, node: dict[str, Any]) -> None:
    """The API server gives untyped preserve-unknown-fields nodes no CEL type and refuses a CRD
    with rules on one ("failed to retrieve type information for x-kubernetes-validations")."""
    if "x-kubernetes-validations" in node:
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path


def test_union_fields_are_typed_for_kubernetes() -> None:
    nodes = dict(ALL_NODES)
    for name in ("epochs", "batchSize"):
        node = nodes[f".spec.training.{name}"]
        assert node["x-kubernetes-int-or-string"] is True
        assert node["x-kubernetes-validations"][0]["message"].endswith("or 'auto'")
    for name in ("learningRate", "gradientCheckpointing"):
        node = nodes[f".spec.training.{name}"]
        assert node["x-kubernetes-preserve-unknown-fields"] is True
        assert "'auto'" in node["description"]


def test_root_schema_shape(version: dict[str, Any]) -> None:
    root = version["schema"]["openAPIV3Schema"]
    assert root["type"] == "object"
    assert root["required"] == ["spec"]
    assert set(root["properties"]) == {"apiVersion", "kind", "metadata", "spec", "status"}
    assert root["properties"]["metadata"] == {"type": "object"}
    assert set(root["properties"]["spec"]["required"]) == {"model", "dataset", "output"}


def test_status_schema_matches_the_model(version: dict[str, Any]) -> None:
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    aliases = {f.alias or n for n, f in FineTuneJobStatus.model_fields.items()}
    assert set(status["properties"]) == aliases
    assert "x-kubernetes-validations" not in yaml.safe_dump(status)


# --------------------------------------------------------------------------------------------
# CEL rules as written in the CRD
# --------------------------------------------------------------------------------------------
RULE_NODES = [(p, n) for p, n in ALL_NODES if "x-kubernetes-validations" in n]


def _resolve(node: dict[str, Any], field_path: str) -> dict[str, Any] | None:
    for part in field_path.strip(".").split("."):
        node = node.get("properties", {}).get(part)
        if node is None:
            return None
    return node


@pytest.mark.parametrize(("path", "node"), RULE_NODES, ids=[p for p, _ in RULE_NODES])
def test_rules_are_well_formed(path: str, node: dict[str, Any]) -> None:
    for rule in node["x-kubernetes-validations"]:
        assert set(rule) <= {"rule", "message", "fieldPath", "reason", "messageExpression"}
        assert rule["rule"].strip()
        assert rule["message"].strip() and "\n" not in rule["message"]
        if "fieldPath" in rule:
            # the API server requires fieldPath to name a field of this node's schema
            assert _resolve(node, rule["fieldPath"]) is not None, (path, rule["fieldPath"])


def test_every_spec_rule_is_in_the_crd() -> None:
    nodes = dict(ALL_NODES)
    for where, rules in gen.SPEC_RULES.items():
        node = nodes[".spec" + "".join(f".{p}" for p in where)]
        for rule in rules:
            assert rule in node["x-kubernetes-validations"], (where, rule["rule"])


def test_training_part_is_immutable_and_placement_is_not() -> None:
    nodes = dict(ALL_NODES)
    immutable = {
        path.removeprefix(".spec.")
        for path, node in nodes.items()
        if any(r["rule"] == "self == oldSelf" for r in node.get("x-kubernetes-validations", []))
    }
    assert immutable == {
        "model",
        "dataset",
        "task",
        "method",
        "training",
        "evaluation",
        "output",
        "tracking",
    }
    # on spec itself, transition rules only pin the presence of the optional run sections
    # (a field's own rule does not run where the old object lacks it); placement stays mutable
    transitions = [
        r["rule"] for r in nodes[".spec"]["x-kubernetes-validations"] if "oldSelf" in r["rule"]
    ]
    required = set(nodes[".spec"]["required"])
    optional = ("task", "method", "training", "evaluation", "tracking")
    assert transitions == [f"has(self.{f}) == has(oldSelf.{f})" for f in optional]
    assert not required & set(optional)


# --------------------------------------------------------------------------------------------
# printer columns
# --------------------------------------------------------------------------------------------
def _column_node(root: dict[str, Any], json_path: str) -> dict[str, Any] | None:
    node: dict[str, Any] | None = root
    for part in re.findall(r"\.([A-Za-z]+)(\[[^\]]*\])?", json_path):
        name, index = part
        if node is None:
            return None
        if name == "metadata" and node is root:
            return {"type": "string", "format": "date-time"}  # creationTimestamp
        node = node.get("properties", {}).get(name)
        if index and node is not None:
            node = node.get("items")
    return node


def test_printer_columns(version: dict[str, Any]) -> None:
    columns = version["additionalPrinterColumns"]
    default = [c["name"] for c in columns if c.get("priority", 0) == 0]
    assert default == ["Phase", "Progress", "Loss", "ETA", "Age"]
    assert columns[default.index("Age")]["jsonPath"] == ".metadata.creationTimestamp"
    root = version["schema"]["openAPIV3Schema"]
    kinds = {"string": "string", "number": "number", "integer": "integer", "boolean": "boolean"}
    for column in columns:
        path = column["jsonPath"]
        # never "the last/first condition": filter conditions by type, or use status fields
        assert not re.search(r"\[\s*-?\d+\s*\]|\[\*\]|\[-?\d*:-?\d*\]", path), path
        node = _column_node(root, path)
        assert node is not None, f"column {column['name']}: {path} is not in the schema"
        if column["type"] != "date":
            assert kinds.get(node.get("type", "")) == column["type"], column
        condition = re.search(r'@\.type=="([^"]+)"', path)
        if condition:
            types = root["properties"]["status"]["properties"]["conditions"]["items"]
            assert condition.group(1) in types["properties"]["type"]["enum"]
