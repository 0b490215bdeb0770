"""Render the FineTuneJob CustomResourceDefinition from the API models.

    python -m finetune_operator.crd            # write crds/ and the Helm chart's copy
    python -m finetune_operator.crd --check    # exit 1 if a committed copy differs
    python -m finetune_operator.crd --stdout   # print it

The pydantic JSON schema is turned into a Kubernetes *structural* schema: $refs inlined,
optional unions collapsed, `int | "auto"` as int-or-string, other scalar unions as
untyped nodes (checked by the operator's model: the API server allows no CEL rule on
an untyped node), and the cross-field rules the API needs as
`x-kubernetes-validations` (including immutability of the training part of the spec).
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Any

import yaml
from finetune_trainer.config import TrainingSpec

from finetune_operator.api import (
    CATEGORIES,
    FSDP_NEEDS_WORKERS,
    GROUP,
    KBIT_NEEDS_GPU,
    KIND,
    MLFLOW_SECRET_UNUSED,
    NODE_SHARDING_NEEDS_GROUP,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    WANDB_NEEDS_KEY,
    WANDB_SECRET_UNUSED,
    FineTuneJobSpec,
    FineTuneJobStatus,
)

Schema = dict[str, Any]

CRD_FILENAME = f"{GROUP}_{PLURAL}.yaml"
REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_PATHS = (
    REPO_ROOT / "crds" / CRD_FILENAME,
    REPO_ROOT / "helm" / "finetune-operator" / "crds" / CRD_FILENAME,
)

# Fields under spec that define the training run: immutable once created.
IMMUTABLE_SPEC_FIELDS = (
    "model",
    "dataset",
    "task",
    "method",
    "training",
    "evaluation",
    "output",
    "tracking",
)

_DROP_KEYS = {"title", "default", "additionalProperties_false", "examples"}


def _rule(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    out = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


_DEFAULT_SAVE_STEPS = TrainingSpec.model_fields["save_steps"].default
_NO_GENERATION_EVAL = "!has(self.evaluation) || !has(self.evaluation.generation)"
_KBIT = (
    "has(self.method) && ((has(self.method.type) && self.method.type == 'qlora') || "
    "has(self.method.quantization))"
)
_VIRTUAL_TOKENS = (
    "has(self.method) && has(self.method.type) && self.method.type in ['prefix', 'prompt']"
)
_FSDP = (
    "has(self.training) && has(self.training.distributed) && "
    "has(self.training.distributed.strategy) && self.training.distributed.strategy == 'fsdp'"
)
_NODE_SHARDING = (
    "has(self.training) && has(self.training.distributed) && "
    "has(self.training.distributed.fsdp) && has(self.training.distributed.fsdp.sharding) && "
    "self.training.distributed.fsdp.sharding == 'node'"
)
_PREFERENCE = (
    "has(self.training) && has(self.training.objective) && "
    "self.training.objective in ['dpo', 'orpo']"
)
_WANDB = "has(self.tracking) && has(self.tracking.wandb)"
_WANDB_ONLINE = (
    f"{_WANDB} && (!has(self.tracking.wandb.mode) || self.tracking.wandb.mode == 'online')"
)
_TOKEN_BATCHES = (
    "has(self.training) && has(self.training.batchTokens) && type(self.training.batchTokens) == int"
)
_NODES = "(has(self.resources) && has(self.resources.nodes) ? self.resources.nodes : 1)"
_GPUS = "(has(self.resources) && has(self.resources.gpus) ? self.resources.gpus : 1)"

# CEL rules attached to nodes of the spec schema, keyed by property path under spec.
# They mirror the pydantic cross-field validators (whose messages name the same fields).
SPEC_RULES: dict[tuple[str, ...], list[dict[str, str]]] = {
    (): [
        _rule(
            "!has(self.task) || self.task != 'sequence-classification' || "
            "!has(self.dataset.format) || self.dataset.format in ['auto', 'classification']",
            "spec.dataset.format: sequence-classification needs classification data (text/label)",
            ".dataset.format",
        ),
        _rule(
            "(has(self.task) && self.task == 'sequence-classification') || "
            "!has(self.dataset.format) || self.dataset.format != 'classification'",
            "spec.dataset.format: classification data needs task sequence-classification",
            ".dataset.format",
        ),
        _rule(
            "!has(self.output.mergeAdapter) || !self.output.mergeAdapter || "
            "(has(self.method) && has(self.method.type) ? "
            "self.method.type in ['lora', 'dora', 'qlora', 'ia3'] : true)",
            "spec.output.mergeAdapter: only lora, dora, qlora and ia3 adapters can be merged",
            ".output.mergeAdapter",
        ),
        _rule(
            "!has(self.dataset.mix) || !has(self.task) || self.task == 'causal-lm'",
            "spec.dataset.mix: only for task causal-lm",
            ".dataset.mix",
        ),
        _rule(
            f"{_NO_GENERATION_EVAL} || !has(self.task) || self.task == 'causal-lm'",
            "spec.evaluation.generation: only for task causal-lm",
            ".evaluation.generation",
        ),
        _rule(
            f"{_NO_GENERATION_EVAL} || !has(self.dataset.format) || self.dataset.format != 'text'",
            "spec.evaluation.generation: needs prompt/completion data (alpaca, chat or "
            "completion); text has no prompt to answer",
            ".evaluation.generation",
        ),
        _rule(
            f"{_NO_GENERATION_EVAL} || has(self.dataset.validation) || has(self.dataset.test)",
            "spec.evaluation.generation: needs held-out prompts (set dataset.validation or "
            "dataset.test)",
            ".evaluation.generation",
        ),
        _rule(
            "!has(self.training) || (!has(self.training.earlyStopping) && "
            "!has(self.training.evalSteps)) || has(self.dataset.validation)",
            "spec.training: evalSteps and earlyStopping need a validation split "
            "(set spec.dataset.validation)",
            ".training",
        ),
        _rule(
            f"!({_KBIT}) || "
            "!has(self.resources) || !has(self.resources.gpus) || self.resources.gpus > 0",
            f"spec.{KBIT_NEEDS_GPU}",
            ".resources.gpus",
        ),
        _rule(
            f"!({_FSDP}) || {_NODES} * ({_GPUS} > 1 ? {_GPUS} : 1) > 1",
            f"spec.{FSDP_NEEDS_WORKERS}",
            ".training.distributed.strategy",
        ),
        _rule(
            f"!({_NODE_SHARDING}) || ({_NODES} > 1 && {_GPUS} > 1)",
            f"spec.{NODE_SHARDING_NEEDS_GROUP}",
            ".training.distributed.fsdp.sharding",
        ),
        _rule(
            f"!({_FSDP}) || !({_VIRTUAL_TOKENS})",
            "spec.training.distributed.strategy: prefix and prompt tuning are not sharded by "
            "FSDP; use ddp",
            ".training.distributed.strategy",
        ),
        _rule(
            f"!({_FSDP}) || !has(self.method) || !has(self.method.quantization) || "
            "!has(self.method.quantization.bits) || self.method.quantization.bits != 8",
            "spec.training.distributed.strategy: FSDP cannot shard an 8-bit base; use 4-bit "
            "quantization (qlora) or ddp",
            ".training.distributed.strategy",
        ),
        _rule(
            f"!({_FSDP}) || !has(self.output.mergeAdapter) || !self.output.mergeAdapter",
            "spec.output.mergeAdapter: an FSDP run's model is sharded and cannot be merged in "
            "the trainer; merge the adapter afterwards, or use ddp",
            ".output.mergeAdapter",
        ),
        _rule(
            f"!({_FSDP}) || {_NO_GENERATION_EVAL}",
            "spec.evaluation.generation: an FSDP run's model is sharded and cannot generate in "
            "the trainer; use ddp, or evaluate the saved model afterwards",
            ".evaluation.generation",
        ),
        _rule(
            f"!({_VIRTUAL_TOKENS}) || !has(self.task) || self.task == 'causal-lm'",
            "spec.method.type: prefix and prompt tuning train causal-lm only (PEFT cannot run "
            "them in front of a classification head)",
            ".method.type",
        ),
        _rule(
            f"!({_VIRTUAL_TOKENS}) || !has(self.training) || !has(self.training.precision) || "
            "!(self.training.precision in ['bf16', 'fp16'])",
            "spec.training.precision: prefix and prompt tuning run in fp32 (mixed precision "
            "breaks the trainer's fused LM head for virtual tokens); set it to fp32 or auto",
            ".training.precision",
        ),
        _rule(
            f"!has(self.dataset.format) || self.dataset.format != 'preference' || ({_PREFERENCE})",
            "spec.training.objective: preference data (prompt/chosen/rejected) needs objective "
            "dpo or orpo",
            ".training.objective",
        ),
        _rule(
            f"!({_PREFERENCE}) || !has(self.task) || self.task == 'causal-lm'",
            "spec.training.objective: dpo and orpo train causal-lm only",
            ".training.objective",
        ),
        _rule(
            f"!({_PREFERENCE}) || !has(self.dataset.format) || "
            "self.dataset.format in ['auto', 'preference']",
            "spec.dataset.format: objectives dpo and orpo need preference data "
            "(prompt/chosen/rejected)",
            ".dataset.format",
        ),
        _rule(
            f"!({_PREFERENCE}) || !has(self.dataset.packing) || !self.dataset.packing",
            "spec.dataset.packing: not used by objectives dpo and orpo",
            ".dataset.packing",
        ),
        _rule(
            f"!({_PREFERENCE}) || !({_VIRTUAL_TOKENS})",
            "spec.method.type: prefix and prompt tuning are not supported with objectives dpo "
            "and orpo; use lora, dora, qlora, ia3 or full",
            ".method.type",
        ),
        _rule(
            f"!({_PREFERENCE}) || !({_FSDP})",
            "spec.training.distributed.strategy: objectives dpo and orpo are not sharded by "
            "FSDP here; use ddp",
            ".training.distributed.strategy",
        ),
        _rule(
            "!has(self.secrets) || !has(self.secrets.mlflow) || "
            "(has(self.tracking) && has(self.tracking.mlflow))",
            f"spec.{MLFLOW_SECRET_UNUSED}",
            ".secrets.mlflow",
        ),
        _rule(
            f"!has(self.secrets) || !has(self.secrets.wandb) || ({_WANDB})",
            f"spec.{WANDB_SECRET_UNUSED}",
            ".secrets.wandb",
        ),
        _rule(
            f"!({_WANDB_ONLINE}) || (has(self.secrets) && has(self.secrets.wandb))",
            f"spec.{WANDB_NEEDS_KEY}",
            ".secrets.wandb",
        ),
        _rule(
            f"!({_PREFERENCE}) || !({_TOKEN_BATCHES})",
            "spec.training.batchTokens: not used by objectives dpo and orpo (their batches are "
            "pairs); use batchSize",
            ".training.batchTokens",
        ),
        _rule(
            f"!({_TOKEN_BATCHES}) || !has(self.task) || self.task == 'causal-lm'",
            "spec.training.batchTokens: only for task causal-lm; use batchSize for "
            "sequence-classification",
            ".training.batchTokens",
        ),
        _rule(
            f"!({_TOKEN_BATCHES}) || !({_VIRTUAL_TOKENS})",
            "spec.training.batchTokens: prefix and prompt tuning train padded rows (their "
            "virtual tokens are per row); use batchSize",
            ".training.batchTokens",
        ),
        _rule(
            "['pvc://', 's3://', 'gs://', 'gcs://', 'az://', 'abfs://', 'hf://']"
            ".exists(p, self.output.uri.startsWith(p))",
            "spec.output.uri: a cluster run needs durable storage: pvc://, s3:// or hf://",
            ".output.uri",
        ),
    ],
    ("dataset",): [
        _rule(
            "has(self.source) != has(self.inline)",
            "spec.dataset: set exactly one of source or inline",
        ),
        _rule(
            "!has(self.completionOnlyLoss) || !self.completionOnlyLoss || "
            "!has(self.format) || self.format != 'text'",
            "spec.dataset.completionOnlyLoss: plain text has no prompt/completion boundary",
            ".completionOnlyLoss",
        ),
    ],
    ("dataset", "validation"): [
        _rule(
            "has(self.source) != has(self.splitRatio)",
            "spec.dataset.validation: set exactly one of source or splitRatio",
        )
    ],
    ("dataset", "test"): [
        _rule(
            "has(self.source) != has(self.splitRatio)",
            "spec.dataset.test: set exactly one of source or splitRatio",
        )
    ],
    ("training",): [
        _rule(
            "!has(self.earlyStopping) || !has(self.evalSteps) || "
            f"(has(self.saveSteps) ? self.saveSteps : {_DEFAULT_SAVE_STEPS}) % self.evalSteps == 0",
            "spec.training.saveSteps: must be a multiple of evalSteps when earlyStopping is set",
            ".saveSteps",
        ),
        _rule(
            "!has(self.dpo) || (has(self.objective) && self.objective == 'dpo')",
            "spec.training.dpo: only used by objective dpo",
            ".dpo",
        ),
        _rule(
            "!has(self.orpo) || (has(self.objective) && self.objective == 'orpo')",
            "spec.training.orpo: only used by objective orpo",
            ".orpo",
        ),
        _rule(
            "!has(self.batchTokens) || type(self.batchTokens) != int || "
            "!has(self.batchSize) || type(self.batchSize) != int",
            "spec.training.batchTokens: set batchSize or batchTokens, not both (a token budget "
            "sizes the batch; leave batchSize auto)",
            ".batchTokens",
        ),
    ],
    ("training", "dpo"): [
        _rule(
            "!has(self.labelSmoothing) || self.labelSmoothing == 0.0 || "
            "(has(self.lossType) && self.lossType == 'robust')",
            "spec.training.dpo.labelSmoothing: only used by lossType robust",
            ".labelSmoothing",
        )
    ],
    ("training", "distributed"): [
        _rule(
            "!has(self.fsdp) || !has(self.strategy) || self.strategy != 'ddp'",
            "spec.training.distributed.fsdp: only used by strategy fsdp (or auto)",
            ".fsdp",
        )
    ],
    ("method",): [
        _rule(
            "!has(self.lora) || (has(self.type) ? self.type in ['lora', 'dora', 'qlora'] : true)",
            "spec.method.lora: only used by lora, dora and qlora",
            ".lora",
        ),
        _rule(
            "!has(self.prefix) || (has(self.type) && self.type == 'prefix')",
            "spec.method.prefix: only used by method type prefix",
            ".prefix",
        ),
        _rule(
            "!has(self.prompt) || (has(self.type) && self.type == 'prompt')",
            "spec.method.prompt: only used by method type prompt",
            ".prompt",
        ),
        _rule(
            "!has(self.quantization) || !has(self.type) || self.type != 'full'",
            "spec.method.quantization: a full fine-tune cannot train k-bit weights",
            ".quantization",
        ),
    ],
    ("tracking",): [
        _rule(
            "has(self.mlflow) || has(self.wandb) || (has(self.tensorboard) && self.tensorboard)",
            "spec.tracking: set at least one of mlflow, wandb or tensorboard: true",
        )
    ],
    ("method", "lora", "targetModules"): [
        _rule(
            "!self.exists(m, m == 'all-linear') || size(self) == 1",
            "spec.method.lora.targetModules: 'all-linear' cannot be combined with module names",
        )
    ],
}
for _field in IMMUTABLE_SPEC_FIELDS:
    _immutable = (
        f"spec.{_field} is immutable: create a new FineTuneJob to change the run "
        "(suspend may still be changed)"
    )
    SPEC_RULES.setdefault((_field,), []).append(_rule("self == oldSelf", _immutable))
    if not FineTuneJobSpec.model_fields[_field].is_required():
        # A transition rule on a field runs only where the old object has the field, so
        # adding or removing an optional section is caught one level up, on spec.
        SPEC_RULES[()].append(
            _rule(f"has(self.{_field}) == has(oldSelf.{_field})", _immutable, f".{_field}")
        )


def _inline_refs(node: Any, defs: dict[str, Schema]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            target = defs[node["$ref"].rsplit("/", 1)[-1]]
            merged = {
                **_inline_refs(target, defs),
                **{k: v for k, v in node.items() if k != "$ref"},
            }
            return _inline_refs(merged, defs)
        return {k: _inline_refs(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


def _cel_literal(value: Any) -> str:
    return f"'{value}'" if isinstance(value, str) else repr(value).lower()


def _branch_rule(branch: Schema) -> str:
    """A CEL test that `self` matches one (scalar) branch of a union."""
    if "const" in branch:
        cel_type = {str: "string", bool: "bool", int: "int"}[type(branch["const"])]
        return f"(type(self) == {cel_type} && self == {_cel_literal(branch['const'])})"
    kind = branch.get("type")
    if kind == "boolean":
        return "type(self) == bool"
    if kind == "integer":
        test, value = "type(self) == int", "self"
    elif kind == "number":
        test, value = "(type(self) == int || type(self) == double)", "double(self)"
    else:
        raise ValueError(f"unsupported union branch {branch}")
    bounds = [test]
    as_num = (lambda x: f"{float(x)!r}") if kind == "number" else str
    if "minimum" in branch:
        bounds.append(f"{value} >= {as_num(branch['minimum'])}")
    if "exclusiveMinimum" in branch:
        bounds.append(f"{value} > {as_num(branch['exclusiveMinimum'])}")
    if "maximum" in branch:
        bounds.append(f"{value} <= {as_num(branch['maximum'])}")
    return "(" + " && ".join(bounds) + ")"


def _branch_text(branch: Schema) -> str:
    """Words for one branch of a union, for the CEL rule's message."""
    if "const" in branch:
        return repr(branch["const"]) if isinstance(branch["const"], str) else str(branch["const"])
    text = {"integer": "an integer", "number": "a number", "boolean": "true/false"}[branch["type"]]
    low = branch.get("minimum", branch.get("exclusiveMinimum"))
    high = branch.get("maximum")
    if low is not None and high is not None:
        opener = "(" if "exclusiveMinimum" in branch else "["
        text += f" in {opener}{low}, {high}]"
    return text


def _union(node: Schema) -> Schema:
    """Collapse an anyOf into something structural."""
    branches = [b for b in node["anyOf"] if b.get("type") != "null"]
    rest = {k: v for k, v in node.items() if k != "anyOf"}
    if len(branches) == 1:
        collapsed: Schema = _structural({**branches[0], **rest})
        return collapsed
    if all(b.get("type") in ("boolean", "integer", "number", "string") for b in branches):
        described = {k: v for k, v in rest.items() if k == "description"}
        rule = " || ".join(_branch_rule(b) for b in branches)
        choices = " or ".join(_branch_text(b) for b in branches)
        if {b.get("type") for b in branches} <= {"integer", "string"}:
            described["x-kubernetes-int-or-string"] = True
            described["x-kubernetes-validations"] = [_rule(rule, f"must be {choices}")]
        else:
            # An untyped node has no CEL type: the API server refuses a CRD with rules on it
            # ("failed to retrieve type information for x-kubernetes-validations"), so the
            # value is checked by the operator's model only.
            described["x-kubernetes-preserve-unknown-fields"] = True
            text = described.get("description", "")
            described["description"] = f"{text} Must be {choices}.".strip()
        return described
    raise ValueError(f"cannot express union {node} in a structural schema")


def _structural(node: Any) -> Any:
    """Convert a pydantic JSON schema node into a Kubernetes structural schema node."""
    if isinstance(node, list):
        return [_structural(v) for v in node]
    if not isinstance(node, dict):
        return node
    if "anyOf" in node:
        return _union(node)
    out: Schema = {}
    for key, value in node.items():
        if key in _DROP_KEYS or (key == "additionalProperties" and value is False):
            continue
        if key == "const":
            out["enum"] = [value]
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "properties":
            out[key] = {k: _structural(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = _structural(value)
        else:
            out[key] = value
    if "properties" in out:
        out.setdefault("type", "object")
    return out


def _attach_rules(schema: Schema, rules: dict[tuple[str, ...], list[dict[str, str]]]) -> None:
    for path, node_rules in rules.items():
        node = schema
        for part in path:
            node = node["properties"][part]
        node.setdefault("x-kubernetes-validations", []).extend(node_rules)


def model_schema(model: type[Any]) -> Schema:
    """The structural openAPIV3Schema of a pydantic model (camelCase, no $ref)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    schema: Schema = _structural(_inline_refs(raw, raw.get("$defs", {})))
    return schema


def spec_schema() -> Schema:
    """The spec schema with its CEL rules."""
    schema = model_schema(FineTuneJobSpec)
    _attach_rules(schema, SPEC_RULES)
    return schema


def _condition_column(name: str, condition: str, field: str, priority: int) -> dict[str, Any]:
    return {
        "name": name,
        "type": "string",
        "jsonPath": f'.status.conditions[?(@.type=="{condition}")].{field}',
        "priority": priority,
    }


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Progress", "type": "number", "jsonPath": ".status.progress.percent"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Method", "type": "string", "jsonPath": ".spec.method.type", "priority": 1},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.source", "priority": 1},
    _condition_column("Failure", "Failed", "reason", 1),
    # the first tracker that has a run page (MLflow, W&B online)
    {
        "name": "Tracking",
        "type": "string",
        "jsonPath": ".status.tracking[?(@.url)].url",
        "priority": 1,
    },
]


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition as a dict."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "finetune-operator"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A fine-tuning run of a language model, "
                            "from dataset validation to a saved adapter.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": model_schema(FineTuneJobStatus),
                            },
                        }
                    },
                }
            ],
        },
    }


HEADER = (
    "# Generated by `python -m finetune_operator.crd` from finetune_operator.api. Do not edit.\n"
)


def render_crd() -> str:
    """The CRD as YAML text, exactly as committed."""
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    """Write, print or check the generated CRD."""
    parser = argparse.ArgumentParser(
        prog="python -m finetune_operator.crd", description="Render the FineTuneJob CRD."
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="fail if a committed copy differs")
    mode.add_argument("--stdout", action="store_true", help="print instead of writing")
    args = parser.parse_args(argv)
    text = render_crd()
    if args.stdout:
        sys.stdout.write(text)
        return 0
    stale = []
    for path in CRD_PATHS:
        current = path.read_text() if path.exists() else ""
        if current == text:
            continue
        if args.check:
            stale.append(path)
            sys.stderr.writelines(
                difflib.unified_diff(
                    current.splitlines(True), text.splitlines(True), str(path), "generated"
                )
            )
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO_ROOT)}")
    if stale:
        print(
            "CRD out of date: run `python -m finetune_operator.crd` and commit "
            + ", ".join(str(p.relative_to(REPO_ROOT)) for p in stale),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
