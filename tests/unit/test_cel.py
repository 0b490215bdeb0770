"""The CRD's CEL rules, evaluated with Kubernetes semantics (see cel_eval) on good and bad
FineTuneJobs: each rule passes a good object and fails a bad one with its own message, the
transition rules get `oldSelf`, and the model agrees with every rule's verdict."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from cel_eval import (
    Preserved,
    Violation,
    compile_rule,
    evaluate,
    messages,
    root_schema,
    to_cel,
    validate_object,
    walk_schema,
)
from celpy import celtypes
from celpy.evaluation import CELEvalError
from finetune_operator.api import ConfigError, parse_spec

SPEC: dict[str, Any] = {
    "model": {"source": "hf://Qwen/Qwen2.5-0.5B"},
    "dataset": {"source": "s3://bucket/train.jsonl"},
    "output": {"uri": "pvc://outputs/run1"},
}


def job(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "run1", "namespace": "default"},
        "spec": spec,
    }


def spec_with(**sections: Any) -> dict[str, Any]:
    """SPEC with whole sections replaced (`dataset={...}` replaces spec.dataset)."""
    out = copy.deepcopy(SPEC)
    out.update(copy.deepcopy(sections))
    return out


def no_errors(violations: list[Violation]) -> list[Violation]:
    errored = [v for v in violations if v.error]
    assert not errored, f"rules errored instead of answering: {errored}"
    return violations


def message_of(fragment: str) -> str:
    """The one CRD rule message containing `fragment`."""
    found = {m for m in _ALL_MESSAGES if fragment in m}
    assert len(found) == 1, (fragment, found)
    return found.pop()


_ALL_MESSAGES = {
    r["message"]
    for _, n in walk_schema(root_schema())
    for r in n.get("x-kubernetes-validations", [])
}

# (id, message fragment, where the API server reports it, good spec, bad spec)
CASES: list[tuple[str, str, str, dict[str, Any], dict[str, Any]]] = [
    (
        "seqcls-needs-classification",
        "sequence-classification needs classification data",
        ".spec.dataset.format",
        spec_with(
            task="sequence-classification",
            dataset={"source": "s3://b/imdb", "format": "classification"},
        ),
        spec_with(task="sequence-classification", dataset={"source": "s3://b/t", "format": "chat"}),
    ),
    (
        "classification-needs-seqcls",
        "classification data needs task sequence-classification",
        ".spec.dataset.format",
        spec_with(task="causal-lm", dataset={"source": "s3://b/t", "format": "alpaca"}),
        spec_with(dataset={"source": "s3://b/t", "format": "classification"}),
    ),
    (
        "merge-needs-adapter",
        "spec.output.mergeAdapter: only lora",
        ".spec.output.mergeAdapter",
        spec_with(method={"type": "ia3"}, output={"uri": "s3://b/o", "mergeAdapter": True}),
        spec_with(method={"type": "full"}, output={"uri": "s3://b/o", "mergeAdapter": True}),
    ),
    (
        "merge-prefix",
        "spec.output.mergeAdapter: only lora",
        ".spec.output.mergeAdapter",
        spec_with(method={"type": "prefix"}, output={"uri": "s3://b/o", "mergeAdapter": False}),
        spec_with(method={"type": "prefix"}, output={"uri": "s3://b/o", "mergeAdapter": True}),
    ),
    (
        "eval-steps-need-validation",
        "evalSteps and earlyStopping need a validation split",
        ".spec.training",
        spec_with(
            dataset={"source": "s3://b/t", "validation": {"splitRatio": 0.1}},
            training={"evalSteps": 10},
        ),
        spec_with(training={"evalSteps": 10}),
    ),
    (
        "early-stopping-needs-validation",
        "evalSteps and earlyStopping need a validation split",
        ".spec.training",
        spec_with(
            dataset={"source": "s3://b/t", "validation": {"source": "s3://b/v"}},
            training={"earlyStopping": {"patience": 2}},
        ),
        spec_with(training={"earlyStopping": {"patience": 2}}),
    ),
    (
        "qlora-needs-gpu",
        "k-bit loading (qlora, or method.quantization) needs a GPU",
        ".spec.resources.gpus",
        spec_with(method={"type": "qlora"}, resources={"gpus": 1}),
        spec_with(method={"type": "qlora"}, resources={"gpus": 0}),
    ),
    (
        "quantized-lora-needs-gpu",
        "k-bit loading (qlora, or method.quantization) needs a GPU",
        ".spec.resources.gpus",
        spec_with(method={"type": "lora"}, resources={"gpus": 0}),
        spec_with(method={"type": "dora", "quantization": {"bits": 8}}, resources={"gpus": 0}),
    ),
    (
        "prefix-causal-lm-only",
        "prefix and prompt tuning train causal-lm only",
        ".spec.method.type",
        spec_with(method={"type": "prefix"}),
        spec_with(
            task="sequence-classification",
            dataset={"source": "s3://b/t", "format": "classification"},
            method={"type": "prefix"},
        ),
    ),
    (
        "prompt-causal-lm-only",
        "prefix and prompt tuning train causal-lm only",
        ".spec.method.type",
        spec_with(task="sequence-classification", method={"type": "ia3"}),
        spec_with(task="sequence-classification", method={"type": "prompt"}),
    ),
    (
        "virtual-tokens-fp32",
        "prefix and prompt tuning run in fp32",
        ".spec.training.precision",
        spec_with(method={"type": "prompt"}, training={"precision": "fp32"}),
        spec_with(method={"type": "prompt"}, training={"precision": "bf16"}),
    ),
    (
        "virtual-tokens-no-fp16",
        "prefix and prompt tuning run in fp32",
        ".spec.training.precision",
        spec_with(method={"type": "lora"}, training={"precision": "fp16"}),
        spec_with(method={"type": "prefix"}, training={"precision": "fp16"}),
    ),
    (
        "mix-causal-lm",
        "dataset.mix: only for task causal-lm",
        ".spec.dataset.mix",
        spec_with(dataset={"source": "s3://b/t", "mix": [{"source": "s3://b/g", "fraction": 0.2}]}),
        spec_with(
            task="sequence-classification",
            dataset={"source": "s3://b/t", "mix": [{"source": "s3://b/g", "fraction": 0.2}]},
        ),
    ),
    (
        "generation-eval-causal-lm",
        "evaluation.generation: only for task causal-lm",
        ".spec.evaluation.generation",
        spec_with(
            dataset={"source": "s3://b/t", "validation": {"splitRatio": 0.1}},
            evaluation={"generation": {}},
        ),
        spec_with(
            task="sequence-classification",
            dataset={"source": "s3://b/t", "validation": {"splitRatio": 0.1}},
            evaluation={"generation": {}},
        ),
    ),
    (
        "generation-eval-needs-prompts",
        "evaluation.generation: needs prompt/completion data",
        ".spec.evaluation.generation",
        spec_with(
            dataset={"source": "s3://b/t", "format": "chat", "test": {"source": "s3://b/x"}},
            evaluation={"generation": {"examples": 8}},
        ),
        spec_with(
            dataset={"source": "s3://b/t", "format": "text", "test": {"source": "s3://b/x"}},
            evaluation={"generation": {}},
        ),
    ),
    (
        "generation-eval-needs-held-out",
        "evaluation.generation: needs held-out prompts",
        ".spec.evaluation.generation",
        spec_with(evaluation={}),
        spec_with(evaluation={"generation": {}}),
    ),
    (
        "fsdp-needs-workers",
        "fsdp shards over several workers",
        ".spec.training.distributed.strategy",
        spec_with(
            training={"distributed": {"strategy": "fsdp"}}, resources={"nodes": 2, "gpus": 0}
        ),
        spec_with(training={"distributed": {"strategy": "fsdp"}}, resources={"gpus": 1}),
    ),
    (
        "node-sharding-needs-a-group",
        "sharding: node shards within a pod",
        ".spec.training.distributed.fsdp.sharding",
        spec_with(
            training={"distributed": {"strategy": "fsdp", "fsdp": {"sharding": "node"}}},
            resources={"nodes": 2, "gpus": 8},
        ),
        spec_with(
            training={"distributed": {"fsdp": {"sharding": "node"}}},
            resources={"nodes": 1, "gpus": 8},
        ),
    ),
    (
        "fsdp-not-for-virtual-tokens",
        "prefix and prompt tuning are not sharded by FSDP",
        ".spec.training.distributed.strategy",
        spec_with(method={"type": "prompt"}, resources={"gpus": 2}),
        spec_with(
            method={"type": "prefix"},
            training={"distributed": {"strategy": "fsdp"}},
            resources={"gpus": 2},
        ),
    ),
    (
        "fsdp-not-for-8-bit",
        "FSDP cannot shard an 8-bit base",
        ".spec.training.distributed.strategy",
        spec_with(
            method={"type": "qlora"},
            training={"distributed": {"strategy": "fsdp"}},
            resources={"gpus": 2},
        ),
        spec_with(
            method={"type": "lora", "quantization": {"bits": 8}},
            training={"distributed": {"strategy": "fsdp"}},
            resources={"gpus": 2},
        ),
    ),
    (
        "fsdp-no-merge",
        "an FSDP run's model is sharded and cannot be merged",
        ".spec.output.mergeAdapter",
        spec_with(output={"uri": "s3://b/o", "mergeAdapter": True}, resources={"gpus": 2}),
        spec_with(
            output={"uri": "s3://b/o", "mergeAdapter": True},
            training={"distributed": {"strategy": "fsdp"}},
            resources={"gpus": 2},
        ),
    ),
    (
        "fsdp-no-generation-eval",
        "an FSDP run's model is sharded and cannot generate",
        ".spec.evaluation.generation",
        spec_with(
            dataset={"source": "s3://b/t", "validation": {"splitRatio": 0.1}},
            evaluation={"generation": {}},
            resources={"gpus": 2},
        ),
        spec_with(
            dataset={"source": "s3://b/t", "validation": {"splitRatio": 0.1}},
            evaluation={"generation": {}},
            training={"distributed": {"strategy": "fsdp"}},
            resources={"gpus": 2},
        ),
    ),
    (
        "fsdp-settings-need-fsdp",
        "fsdp: only used by strategy fsdp",
        ".spec.training.distributed.fsdp",
        spec_with(training={"distributed": {"fsdp": {"cpuOffload": True}}}, resources={"gpus": 2}),
        spec_with(training={"distributed": {"strategy": "ddp", "fsdp": {}}}, resources={"gpus": 2}),
    ),
    (
        "durable-output",
        "cluster run needs durable storage",
        ".spec.output.uri",
        spec_with(output={"uri": "hf://org/repo"}),
        spec_with(output={"uri": "./outputs/run1"}),
    ),
    (
        "tracking-some",
        "spec.tracking: set at least one of",
        ".spec.tracking",
        spec_with(tracking={"tensorboard": True}),
        spec_with(tracking={"tensorboard": False, "runName": "r"}),
    ),
    (
        "mlflow-secret-unused",
        "spec.secrets.mlflow: only used by tracking.mlflow",
        ".spec.secrets.mlflow",
        spec_with(
            tracking={"mlflow": {"trackingUri": "http://mlflow:5000", "experiment": "e"}},
            secrets={"mlflow": {"name": "mlflow-auth"}},
        ),
        spec_with(tracking={"tensorboard": True}, secrets={"mlflow": {"name": "mlflow-auth"}}),
    ),
    (
        "wandb-secret-unused",
        "spec.secrets.wandb: only used by tracking.wandb",
        ".spec.secrets.wandb",
        spec_with(tracking={"wandb": {"project": "p"}}, secrets={"wandb": {"name": "wandb"}}),
        spec_with(secrets={"wandb": {"name": "wandb"}}),
    ),
    (
        "wandb-online-needs-key",
        "spec.secrets.wandb: W&B online mode needs an API key",
        ".spec.secrets.wandb",
        spec_with(tracking={"wandb": {"project": "p", "mode": "offline"}}),
        spec_with(tracking={"wandb": {"project": "p"}}, secrets={"storage": {"name": "s3"}}),
    ),
    (
        "dataset-both",
        "spec.dataset: set exactly one of source or inline",
        ".spec.dataset",
        spec_with(dataset={"inline": [{"text": "hello"}], "format": "text"}),
        spec_with(dataset={"source": "s3://b/t", "inline": [{"text": "hello"}]}),
    ),
    (
        "dataset-neither",
        "spec.dataset: set exactly one of source or inline",
        ".spec.dataset",
        spec_with(dataset={"source": "s3://b/t", "format": "chat"}),
        spec_with(dataset={"format": "chat"}),
    ),
    (
        "completion-only-text",
        "completionOnlyLoss: plain text",
        ".spec.dataset.completionOnlyLoss",
        spec_with(dataset={"source": "s3://b/t", "format": "text", "completionOnlyLoss": False}),
        spec_with(dataset={"source": "s3://b/t", "format": "text", "completionOnlyLoss": True}),
    ),
    (
        "validation-both",
        "spec.dataset.validation: set exactly one",
        ".spec.dataset.validation",
        spec_with(dataset={"source": "s3://b/t", "validation": {"splitRatio": 0.2}}),
        spec_with(
            dataset={"source": "s3://b/t", "validation": {"splitRatio": 0.2, "source": "s3://v"}}
        ),
    ),
    (
        "test-neither",
        "spec.dataset.test: set exactly one",
        ".spec.dataset.test",
        spec_with(dataset={"source": "s3://b/t", "test": {"source": "s3://b/test.jsonl"}}),
        spec_with(dataset={"source": "s3://b/t", "test": {}}),
    ),
    (
        "lora-on-full",
        "spec.method.lora: only used",
        ".spec.method.lora",
        spec_with(method={"type": "dora", "lora": {"r": 8}}),
        spec_with(method={"type": "full", "lora": {"r": 8}}),
    ),
    (
        "prefix-on-lora",
        "spec.method.prefix: only used",
        ".spec.method.prefix",
        spec_with(method={"type": "prefix", "prefix": {"numVirtualTokens": 10}}),
        spec_with(method={"type": "lora", "prefix": {"numVirtualTokens": 10}}),
    ),
    (
        "prefix-without-type",
        "spec.method.prefix: only used",
        ".spec.method.prefix",
        spec_with(method={"type": "prefix"}),
        spec_with(method={"prefix": {}}),  # type defaults to lora
    ),
    (
        "prompt-on-ia3",
        "spec.method.prompt: only used",
        ".spec.method.prompt",
        spec_with(method={"type": "prompt", "prompt": {"initText": "Classify:"}}),
        spec_with(method={"type": "ia3", "prompt": {}}),
    ),
    (
        "quantization-on-full",
        "spec.method.quantization: a full fine-tune",
        ".spec.method.quantization",
        spec_with(method={"type": "lora", "quantization": {"bits": 8}}),
        spec_with(method={"type": "full", "quantization": {"bits": 8}}),
    ),
    (
        "all-linear-alone",
        "'all-linear' cannot be combined",
        ".spec.method.lora.targetModules",
        spec_with(method={"type": "lora", "lora": {"targetModules": ["q_proj", "v_proj"]}}),
        spec_with(method={"type": "lora", "lora": {"targetModules": ["q_proj", "all-linear"]}}),
    ),
    (
        "epochs-range",
        "must be an integer in [1, 1000] or 'auto'",
        ".spec.training.epochs",
        spec_with(training={"epochs": 1000}),
        spec_with(training={"epochs": 0}),
    ),
    (
        "epochs-word",
        "must be an integer in [1, 1000] or 'auto'",
        ".spec.training.epochs",
        spec_with(training={"epochs": "auto"}),
        spec_with(training={"epochs": "many"}),
    ),
    (
        "save-steps-at-evaluations",
        "saveSteps: must be a multiple of evalSteps",
        ".spec.training.saveSteps",
        spec_with(
            dataset={"source": "s3://b/t", "validation": {"splitRatio": 0.1}},
            training={"evalSteps": 5, "saveSteps": 20, "earlyStopping": {"patience": 2}},
        ),
        spec_with(
            dataset={"source": "s3://b/t", "validation": {"splitRatio": 0.1}},
            training={"evalSteps": 5, "saveSteps": 12, "earlyStopping": {"patience": 2}},
        ),
    ),
    (
        "batch-size-range",
        "must be an integer in [1, 4096] or 'auto'",
        ".spec.training.batchSize",
        spec_with(training={"batchSize": 1}),
        spec_with(training={"batchSize": 4097}),
    ),
    (
        "batch-size-word",
        "must be an integer in [1, 4096] or 'auto'",
        ".spec.training.batchSize",
        spec_with(training={"batchSize": "auto"}),
        spec_with(training={"batchSize": "AUTO"}),
    ),
    (
        "preference-data-needs-objective",
        "preference data (prompt/chosen/rejected) needs objective",
        ".spec.training.objective",
        spec_with(
            dataset={"source": "s3://b/pairs", "format": "preference"},
            training={"objective": "dpo"},
        ),
        spec_with(dataset={"source": "s3://b/pairs", "format": "preference"}),
    ),
    (
        "preference-causal-lm-only",
        "dpo and orpo train causal-lm only",
        ".spec.training.objective",
        spec_with(training={"objective": "orpo"}),
        spec_with(task="sequence-classification", training={"objective": "orpo"}),
    ),
    (
        "preference-objective-needs-preference-data",
        "objectives dpo and orpo need preference data",
        ".spec.dataset.format",
        spec_with(dataset={"source": "s3://b/t", "format": "auto"}, training={"objective": "dpo"}),
        spec_with(dataset={"source": "s3://b/t", "format": "chat"}, training={"objective": "dpo"}),
    ),
    (
        "preference-no-packing",
        "packing: not used by objectives dpo and orpo",
        ".spec.dataset.packing",
        spec_with(dataset={"source": "s3://b/t", "packing": True}),
        spec_with(dataset={"source": "s3://b/t", "packing": True}, training={"objective": "dpo"}),
    ),
    (
        "preference-no-virtual-tokens",
        "prefix and prompt tuning are not supported with objectives dpo",
        ".spec.method.type",
        spec_with(method={"type": "ia3"}, training={"objective": "dpo"}),
        spec_with(method={"type": "prefix"}, training={"objective": "dpo"}),
    ),
    (
        "preference-no-fsdp",
        "objectives dpo and orpo are not sharded by FSDP",
        ".spec.training.distributed.strategy",
        spec_with(
            training={"objective": "dpo", "distributed": {"strategy": "ddp"}}, resources={"gpus": 2}
        ),
        spec_with(
            training={"objective": "dpo", "distributed": {"strategy": "fsdp"}},
            resources={"gpus": 2},
        ),
    ),
    (
        "dpo-settings-need-dpo",
        "spec.training.dpo: only used by objective dpo",
        ".spec.training.dpo",
        spec_with(training={"objective": "dpo", "dpo": {"beta": 0.5}}),
        spec_with(training={"objective": "orpo", "dpo": {"beta": 0.5}}),
    ),
    (
        "orpo-settings-need-orpo",
        "spec.training.orpo: only used by objective orpo",
        ".spec.training.orpo",
        spec_with(training={"objective": "orpo", "orpo": {"lambda": 0.2}}),
        spec_with(training={"orpo": {"lambda": 0.2}}),
    ),
    (
        "dpo-label-smoothing-robust-only",
        "labelSmoothing: only used by lossType robust",
        ".spec.training.dpo.labelSmoothing",
        spec_with(
            training={"objective": "dpo", "dpo": {"lossType": "robust", "labelSmoothing": 0.1}}
        ),
        spec_with(training={"objective": "dpo", "dpo": {"lossType": "ipo", "labelSmoothing": 0.1}}),
    ),
    (
        "batch-tokens-not-for-preference",
        "batchTokens: not used by objectives dpo and orpo",
        ".spec.training.batchTokens",
        spec_with(training={"objective": "dpo", "batchTokens": "auto"}),
        spec_with(training={"objective": "dpo", "batchTokens": 4096}),
    ),
    (
        "batch-tokens-or-rows",
        "batchTokens: set batchSize or batchTokens, not both",
        ".spec.training.batchTokens",
        spec_with(training={"batchTokens": 16384, "batchSize": "auto"}),
        spec_with(training={"batchTokens": 16384, "batchSize": 8}),
    ),
    (
        "batch-tokens-causal-lm",
        "batchTokens: only for task causal-lm",
        ".spec.training.batchTokens",
        spec_with(task="causal-lm", training={"batchTokens": 4096}),
        spec_with(
            task="sequence-classification",
            dataset={"source": "s3://b/imdb", "format": "classification"},
            training={"batchTokens": 4096},
        ),
    ),
    (
        "batch-tokens-virtual-tokens",
        "batchTokens: prefix and prompt tuning train padded rows",
        ".spec.training.batchTokens",
        spec_with(method={"type": "prompt"}, training={"batchTokens": "auto"}),
        spec_with(method={"type": "prompt"}, training={"batchTokens": 4096}),
    ),
    (
        "batch-tokens-range",
        "must be an integer in [64, 4194304] or 'auto'",
        ".spec.training.batchTokens",
        spec_with(training={"batchTokens": 64}),
        spec_with(training={"batchTokens": 32}),
    ),
]
CASE_IDS = [c[0] for c in CASES]


@pytest.mark.parametrize(("fragment", "where", "good", "bad"), [c[1:] for c in CASES], ids=CASE_IDS)
def test_good_object_passes(fragment: str, where: str, good: dict[str, Any], bad: Any) -> None:
    assert no_errors(validate_object(job(good))) == []


@pytest.mark.parametrize(("fragment", "where", "good", "bad"), [c[1:] for c in CASES], ids=CASE_IDS)
def test_bad_object_fails_with_the_rule_message(
    fragment: str, where: str, good: Any, bad: dict[str, Any]
) -> None:
    violations = no_errors(validate_object(job(bad)))
    assert [(v.path, v.message) for v in violations] == [(where, message_of(fragment))]


@pytest.mark.parametrize(("fragment", "where", "good", "bad"), [c[1:] for c in CASES], ids=CASE_IDS)
def test_the_model_agrees_with_the_rule(
    fragment: str, where: str, good: dict[str, Any], bad: dict[str, Any]
) -> None:
    parse_spec(good)
    with pytest.raises(ConfigError) as info:
        parse_spec(bad)
    field = where.removeprefix(".")
    assert any(line.split(": ")[0].startswith(field) for line in info.value.errors), (
        field,
        info.value.errors,
    )


def test_every_rule_has_a_failing_case() -> None:
    covered = {message_of(c[1]) for c in CASES}
    immutable = {m for m in _ALL_MESSAGES if "is immutable" in m}
    assert _ALL_MESSAGES - immutable == covered


def test_minimal_object_passes_without_errors() -> None:
    """Every rule copes with absent optional sections (has() on an absent parent is an error in
    Kubernetes, so a rule that forgot a guard shows up here)."""
    assert no_errors(validate_object(job(SPEC))) == []


def test_rules_tolerate_every_optional_section_absent_one_at_a_time() -> None:
    full = spec_with(
        task="causal-lm",
        dataset={"source": "s3://b/t", "format": "alpaca", "validation": {"splitRatio": 0.1}},
        method={"type": "qlora", "lora": {"r": 8}, "quantization": {"bits": 4}},
        training={"epochs": 2, "evalSteps": 10, "earlyStopping": {}},
        evaluation={"generation": {"examples": 4}},
        output={"uri": "s3://b/o", "mergeAdapter": True},
        resources={"gpus": 1},
    )
    assert no_errors(validate_object(job(full))) == []
    for section in ("task", "method", "training", "evaluation", "resources"):
        partial = {k: v for k, v in full.items() if k != section}
        assert no_errors(validate_object(job(partial))) == [], section


# --------------------------------------------------------------------------------------------
# transition rules (oldSelf)
# --------------------------------------------------------------------------------------------
BEFORE = spec_with(
    dataset={"source": "s3://b/t", "format": "alpaca", "validation": {"splitRatio": 0.1}},
    evaluation={"generation": {"examples": 16}},
    method={"type": "lora", "lora": {"r": 8}},
    training={"epochs": 3, "learningRate": 0.001, "gradientCheckpointing": True},
    resources={"gpus": 1},
)


@pytest.mark.parametrize(
    ("section", "value"),
    [
        ("model", {"source": "hf://other/model"}),
        ("dataset", {"source": "s3://b/t", "format": "chat", "validation": {"splitRatio": 0.2}}),
        ("task", "sequence-classification"),
        ("method", {"type": "lora", "lora": {"r": 16}}),
        ("training", {"epochs": "auto", "learningRate": 0.001, "gradientCheckpointing": True}),
        ("training", {"epochs": 3, "learningRate": 0.002, "gradientCheckpointing": True}),
        ("training", {"epochs": 3, "learningRate": 0.001, "gradientCheckpointing": "auto"}),
        ("training", {"epochs": 3, "learningRate": 0.001}),
        ("output", {"uri": "pvc://outputs/run2"}),
        ("evaluation", {"generation": {"examples": 64}}),
        ("tracking", {"tensorboard": True}),
    ],
)
def test_changing_the_run_is_refused(section: str, value: Any) -> None:
    after = {**BEFORE, section: value}
    violations = no_errors(validate_object(job(after), job(BEFORE)))
    immutable = [v for v in violations if "immutable" in v.message]
    assert [(v.path, v.message) for v in immutable] == [
        (f".spec.{section}", message_of(f"spec.{section} is immutable"))
    ]


@pytest.mark.parametrize("section", ["method", "training", "evaluation"])
def test_removing_an_optional_run_section_is_refused(section: str) -> None:
    after = {k: v for k, v in BEFORE.items() if k != section}
    violations = no_errors(validate_object(job(after), job(BEFORE)))
    assert [(v.path, v.message) for v in violations] == [
        (f".spec.{section}", message_of(f"spec.{section} is immutable"))
    ]


def test_optional_sections_absent_before_and_after_pass() -> None:
    assert no_errors(validate_object(job(SPEC), job(SPEC))) == []
    assert no_errors(validate_object(job({**SPEC, "suspend": True}), job(SPEC))) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("suspend", True),
        ("resources", {"gpus": 2, "memory": "32Gi"}),
        ("queueName", "team-b"),
        ("ttlSecondsAfterFinished", 60),
        ("activeDeadlineSeconds", 3600),
        ("backoffLimit", 5),
        ("priorityClassName", "high"),
        ("secrets", {"hfToken": {"name": "hf"}}),
    ],
)
def test_placement_stays_mutable(field: str, value: Any) -> None:
    after = {**BEFORE, field: value}
    assert no_errors(validate_object(job(after), job(BEFORE))) == []


def test_unchanged_run_passes_even_with_reordered_keys() -> None:
    after = {k: BEFORE[k] for k in reversed(list(BEFORE))}
    after["training"] = dict(reversed(list(BEFORE["training"].items())))
    assert no_errors(validate_object(job(after), job(BEFORE))) == []


def test_transition_rules_do_not_run_on_create() -> None:
    assert no_errors(validate_object(job(BEFORE))) == []


def test_number_fields_compare_as_numbers_across_updates() -> None:
    """warmupRatio is `type: number`: 0 and 0.0 are the same double, so no change."""
    before = spec_with(training={"warmupRatio": 0})
    after = spec_with(training={"warmupRatio": 0.0})
    assert no_errors(validate_object(job(after), job(before))) == []


# --------------------------------------------------------------------------------------------
# the untyped unions (learningRate, gradientCheckpointing): no CEL type, checked by the model
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "bad"),
    [("learningRate", 5), ("learningRate", "fast"), ("gradientCheckpointing", "maybe")],
)
def test_untyped_unions_are_left_to_the_model(field: str, bad: Any) -> None:
    """Documented gap: the API server cannot attach CEL to an untyped preserve-unknown-fields
    node, so these values pass the CRD and are refused by the operator's model."""
    spec = spec_with(training={field: bad})
    assert no_errors(validate_object(job(spec))) == []
    with pytest.raises(ConfigError, match=f"spec.training.{field}: "):
        parse_spec(spec)


def test_prefix_with_gradient_checkpointing_is_left_to_the_model() -> None:
    """Same gap: gradientCheckpointing (true/false/auto) is untyped, so no CEL rule can read
    it; the operator's model (and `finetune validate`) refuse prefix tuning with it on."""
    spec = spec_with(method={"type": "prefix"}, training={"gradientCheckpointing": True})
    assert no_errors(validate_object(job(spec))) == []
    with pytest.raises(ConfigError, match=r"spec\.training\.gradientCheckpointing: prefix tuning"):
        parse_spec(spec)
    parse_spec(spec_with(method={"type": "prompt"}, training={"gradientCheckpointing": True}))


# --------------------------------------------------------------------------------------------
# the evaluator has Kubernetes semantics (so the tests above mean what they say)
# --------------------------------------------------------------------------------------------
def test_has_on_an_absent_parent_is_an_error() -> None:
    obj = celtypes.MapType({celtypes.StringType("a"): celtypes.MapType({})})
    assert evaluate("has(self.a)", obj) == celtypes.BoolType(True)
    assert evaluate("has(self.a.b)", obj) == celtypes.BoolType(False)
    assert isinstance(evaluate("has(self.x.b)", obj), CELEvalError)
    assert isinstance(evaluate("self.x == 1", obj), CELEvalError)


def test_heterogeneous_equality() -> None:
    one = celtypes.IntType(1)
    assert evaluate("self == 1.0", one) == celtypes.BoolType(True)
    assert evaluate("self == 'auto'", one) == celtypes.BoolType(False)
    assert evaluate("self != 'auto'", one) == celtypes.BoolType(True)
    assert evaluate("self in ['auto', 1.0]", one) == celtypes.BoolType(True)
    assert evaluate("[1, 'a'] == [1.0, 'a']", one) == celtypes.BoolType(True)
    assert evaluate("{'a': 1} == {'a': 'x'}", one) == celtypes.BoolType(False)


def test_values_are_typed_by_the_schema() -> None:
    nodes = dict(walk_schema(root_schema()))
    assert isinstance(to_cel(0, nodes[".spec.training.warmupRatio"]), celtypes.DoubleType)
    assert isinstance(to_cel(3, nodes[".spec.training.epochs"]), celtypes.IntType)
    assert isinstance(to_cel("auto", nodes[".spec.training.epochs"]), celtypes.StringType)
    assert to_cel(0.1, nodes[".spec.training.learningRate"]) == Preserved(0.1)
    pruned = to_cel({"source": "x", "bogus": 1}, nodes[".spec.model"])
    assert set(pruned) == {celtypes.StringType("source")}


def test_every_rule_parses() -> None:
    for _, node in walk_schema(root_schema()):
        for rule in node.get("x-kubernetes-validations", []):
            compile_rule(rule["rule"])


def test_violation_messages_helper() -> None:
    bad = spec_with(output={"uri": "/tmp/out"})
    assert messages(validate_object(job(bad))) == [message_of("durable storage")]
