"""Test helpers: evaluate a CRD's CEL rules the way the API server does, and turn its
OpenAPI v3 schema into a JSON Schema that `jsonschema` can check objects against.

CEL runs on cel-python (`celpy`) with three Kubernetes semantics added on top:

* values are typed by the schema, like the API server's UnstructuredToVal: ``number``
  fields are doubles even when written as ``1``, int-or-string fields are int or string,
  untyped x-kubernetes-preserve-unknown-fields values are opaque (equality only);
* ``==``, ``!=`` and ``in`` use CEL heterogeneous equality (``1 == 1.0``, ``3 == 'auto'`` is
  false, not an error; lists and maps compare element-wise);
* ``has(a.b)`` is an error when ``a`` itself is absent (celpy would say false).

Rules are attached where the API server attaches them: a rule runs on every node of the
object whose schema carries it; a rule that mentions ``oldSelf`` (a transition rule) only
runs on update, where the old object has a value at the same path (atomic-list items have
no old value). Unknown fields are pruned first, as the API server does.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import celpy
import yaml
from celpy import celtypes
from celpy.evaluation import CELEvalError, Evaluator

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = REPO_ROOT / "crds" / "finetune.dev_finetunejobs.yaml"

Schema = dict[str, Any]


# --------------------------------------------------------------------------------------------
# the CRD
# --------------------------------------------------------------------------------------------
def load_crd(path: Path = CRD_PATH) -> dict[str, Any]:
    crd: dict[str, Any] = yaml.safe_load(path.read_text())
    return crd


def root_schema(crd: dict[str, Any] | None = None) -> Schema:
    """The openAPIV3Schema of the (single) served version."""
    crd = crd or load_crd()
    (version,) = crd["spec"]["versions"]
    schema: Schema = version["schema"]["openAPIV3Schema"]
    return schema


def walk_schema(schema: Schema, path: str = "") -> list[tuple[str, Schema]]:
    """Every schema node with its path (``.spec.model``, ``.spec.x[*]``, ``.spec.m{*}``)."""
    nodes = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        nodes += walk_schema(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        nodes += walk_schema(schema["items"], f"{path}[*]")
    if isinstance(schema.get("additionalProperties"), dict):
        nodes += walk_schema(schema["additionalProperties"], f"{path}{{*}}")
    return nodes


# --------------------------------------------------------------------------------------------
# OpenAPI v3 (Kubernetes flavour) -> JSON Schema
# --------------------------------------------------------------------------------------------
_OPENAPI_ONLY = {
    "x-kubernetes-validations",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "nullable",
}


def to_json_schema(node: Schema) -> Schema:
    """A draft-2020-12 JSON Schema equivalent of a structural OpenAPI v3 schema node.

    int-or-string -> integer or string; boolean exclusiveMinimum/Maximum -> numeric; objects
    reject unknown properties (the API server prunes them, which for a user is the same as
    losing them; the pydantic model rejects them) unless x-kubernetes-preserve-unknown-fields.
    """
    out: Schema = {}
    for key, value in node.items():
        if key in _OPENAPI_ONLY:
            continue
        if key == "properties":
            out[key] = {k: to_json_schema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            continue
        elif key in ("minimum", "maximum"):
            exclusive = node.get("exclusiveMinimum" if key == "minimum" else "exclusiveMaximum")
            out["exclusive" + key.capitalize() if exclusive is True else key] = value
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable"):
        kinds = out.get("type")
        if isinstance(kinds, str):
            out["type"] = [kinds, "null"]
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


# --------------------------------------------------------------------------------------------
# values typed by the schema
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preserved:
    """A value under an untyped x-kubernetes-preserve-unknown-fields node (opaque to CEL)."""

    value: Any


def to_cel(value: Any, schema: Schema) -> Any:
    """Convert a JSON value to CEL as the API server does for this schema node."""
    if value is None:
        return None
    if schema.get("x-kubernetes-int-or-string"):
        if isinstance(value, bool) or not isinstance(value, int | str):
            return CELEvalError("invalid data, expected XIntOrString value", TypeError, ())
        return celtypes.IntType(value) if isinstance(value, int) else celtypes.StringType(value)
    kind = schema.get("type")
    if kind == "object" and isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            return celtypes.MapType(
                {celtypes.StringType(k): to_cel(v, extra) for k, v in value.items()}
            )
        return celtypes.MapType(
            {
                celtypes.StringType(k): to_cel(v, props[k])
                for k, v in value.items()
                if props and k in props  # pruned
            }
        )
    if kind == "array" and isinstance(value, list):
        return celtypes.ListType([to_cel(v, schema.get("items", {})) for v in value])
    if kind == "string" and isinstance(value, str):
        return celtypes.StringType(value)
    if kind == "number" and isinstance(value, int | float) and not isinstance(value, bool):
        return celtypes.DoubleType(value)
    if kind == "integer" and isinstance(value, int) and not isinstance(value, bool):
        return celtypes.IntType(value)
    if kind == "boolean" and isinstance(value, bool):
        return celtypes.BoolType(value)
    if kind is None and schema.get("x-kubernetes-preserve-unknown-fields"):
        return Preserved(copy.deepcopy(value))
    return CELEvalError(f"invalid data {value!r} for type {kind}", TypeError, ())


# --------------------------------------------------------------------------------------------
# Kubernetes CEL semantics on top of celpy
# --------------------------------------------------------------------------------------------
_NUMERIC = (celtypes.IntType, celtypes.UintType, celtypes.DoubleType)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, Preserved) or isinstance(b, Preserved):
        return (
            isinstance(a, Preserved)
            and isinstance(b, Preserved)
            and _go_deep_equal(a.value, b.value)
        )
    if isinstance(a, celtypes.BoolType) or isinstance(b, celtypes.BoolType):
        return isinstance(a, celtypes.BoolType) and isinstance(b, celtypes.BoolType) and a == b
    if isinstance(a, _NUMERIC) and isinstance(b, _NUMERIC):
        return float(a) == float(b) if isinstance(a, float) or isinstance(b, float) else a == b
    if isinstance(a, celtypes.ListType) and isinstance(b, celtypes.ListType):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, celtypes.MapType) and isinstance(b, celtypes.MapType):
        return set(a) == set(b) and all(_equal(a[k], b[k]) for k in a)
    if type(a) is not type(b):
        return False
    return bool(a == b)


def _go_deep_equal(a: Any, b: Any) -> bool:
    """reflect.DeepEqual on decoded JSON: int64 1 and float64 1.0 differ."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_go_deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_go_deep_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _errors_first(*args: Any) -> CELEvalError | None:
    return next((a for a in args if isinstance(a, CELEvalError)), None)


def k8s_eq(a: Any, b: Any) -> Any:
    return _errors_first(a, b) or celtypes.BoolType(_equal(a, b))


def k8s_ne(a: Any, b: Any) -> Any:
    return _errors_first(a, b) or celtypes.BoolType(not _equal(a, b))


def k8s_in(item: Any, container: Any) -> Any:
    if err := _errors_first(item, container):
        return err
    if isinstance(container, celtypes.MapType):
        return celtypes.BoolType(any(_equal(item, k) for k in container))
    if isinstance(container, celtypes.ListType):
        return celtypes.BoolType(any(_equal(item, x) for x in container))
    return CELEvalError(f"no such overload: in {type(container)}", TypeError, ())


_FUNCTIONS = {"_==_": k8s_eq, "_!=_": k8s_ne, "_in_": k8s_in}


class _K8sEvaluator(Evaluator):
    def macro_has_eval(self, exprlist: Any) -> Any:
        """has(e.f): an error when e is an error (e.g. absent), else whether f is set."""
        node = exprlist
        while hasattr(node, "data") and node.data != "member_dot" and len(node.children) == 1:
            node = node.children[0]
        if getattr(node, "data", None) != "member_dot":
            return CELEvalError("has() needs a field selection", SyntaxError, ())
        operand_tree, field = node.children
        operand = self.visit(operand_tree)
        if isinstance(operand, CELEvalError):
            return operand
        if isinstance(operand, celtypes.MapType):
            return celtypes.BoolType(celtypes.StringType(field.value) in operand)
        return CELEvalError(f"has() on {type(operand).__name__}", TypeError, ())


class _Runner(celpy.InterpretedRunner):
    def evaluate(self, context: Any) -> Any:
        return _K8sEvaluator(ast=self.ast, activation=self.new_activation()).evaluate(context)


_ENV = celpy.Environment(runner_class=_Runner)


@functools.cache
def compile_rule(rule: str) -> Any:
    """Parse a rule once (raises celpy's CELParseError if cel-python cannot parse it)."""
    return _ENV.program(_ENV.compile(rule), functions=_FUNCTIONS)


def is_transition_rule(rule: str) -> bool:
    return "oldSelf" in rule


def evaluate(rule: str, self_value: Any, old_value: Any = None) -> Any:
    """Evaluate one rule on already-converted CEL values; returns a value or CELEvalError."""
    activation = {"self": self_value}
    if old_value is not None:
        activation["oldSelf"] = old_value
    try:
        return compile_rule(rule).evaluate(activation)
    except CELEvalError as exc:
        return exc


# --------------------------------------------------------------------------------------------
# walking an object against the schema
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Violation:
    path: str  # where the API server reports it: the node's path plus the rule's fieldPath
    message: str
    rule: str
    error: str | None = None  # set when the rule errored instead of returning false


def validate(schema: Schema, obj: Any, old: Any = None, path: str = "") -> list[Violation]:
    """Every CEL rule violated by `obj` (on update: the transition from `old`)."""
    if obj is None:
        return []
    out: list[Violation] = []
    self_value = to_cel(obj, schema)
    old_value = to_cel(old, schema) if old is not None else None
    for spec in schema.get("x-kubernetes-validations", []):
        rule = spec["rule"]
        if is_transition_rule(rule) and old_value is None:
            continue
        result = evaluate(rule, self_value, old_value)
        where = path + spec.get("fieldPath", "")
        if isinstance(result, CELEvalError):
            out.append(Violation(where, spec["message"], rule, error=str(result.args[0])))
        elif not (isinstance(result, celtypes.BoolType) and bool(result)):
            out.append(Violation(where, spec["message"], rule))
    if isinstance(obj, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        olds = old if isinstance(old, dict) else {}
        for key, value in obj.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                out += validate(sub, value, olds.get(key), f"{path}.{key}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(obj):
            out += validate(schema["items"], value, None, f"{path}[{i}]")
    return out


@functools.cache
def _committed_root() -> Schema:
    return root_schema()  # read-only: shared by every call below


def validate_object(obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[Violation]:
    """CEL violations of a whole FineTuneJob (create, or update from `old`), committed CRD."""
    return validate(_committed_root(), obj, old)


def messages(violations: list[Violation]) -> list[str]:
    return [v.message for v in violations]
