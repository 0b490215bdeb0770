"""The training-run config (finetune_trainer.config): wire format, defaults, field-path errors."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import yaml
from finetune_trainer.config import (
    ConfigError,
    LoraSpec,
    QuantizationSpec,
    RunConfig,
    parse_run_config,
    run_field_names,
)

BASE: dict[str, Any] = {
    "model": {"source": "hf://Qwen/Qwen2.5-0.5B"},
    "dataset": {"source": "s3://bucket/train.jsonl"},
    "output": {"uri": "pvc://outputs/run1"},
}

FULL_YAML = """
model:
  source: pvc://models/llama
  revision: main
  trustRemoteCode: false
  dtype: bfloat16
  attention: sdpa
dataset:
  source: hf://datasets/org/data
  format: chat
  validation: {splitRatio: 0.1}
  test: {source: s3://bucket/test.jsonl}
  maxSeqLength: 2048
  template: chatml
  systemPrompt: You are helpful.
  packing: true
  completionOnlyLoss: true
  duplicates: keep
  overlong: drop
task: causal-lm
method:
  type: dora
  lora: {r: 8, alpha: 16, dropout: 0.1, targetModules: [q_proj, v_proj], useRslora: true}
  quantization: {bits: 8, quantType: fp4, doubleQuant: false, computeDtype: bfloat16}
training:
  epochs: 2
  maxSteps: 500
  learningRate: 0.0002
  batchSize: auto
  gradientAccumulationSteps: 4
  warmupRatio: 0.1
  scheduler: linear
  weightDecay: 0.01
  maxGradNorm: 0.5
  precision: bf16
  gradientCheckpointing: true
  seed: 7
  loggingSteps: 5
  evalSteps: 50
  saveSteps: 50
  saveTotalLimit: 2
  earlyStopping: {patience: 2, metric: eval_loss, threshold: 0.01}
output:
  uri: s3://bucket/runs/1
  mergeAdapter: true
"""

INLINE_YAML = """
model: {source: ./models/tiny}
dataset:
  inline:
    - {messages: [{role: user, content: hi}, {role: assistant, content: hello}]}
    - {instruction: add, input: "1 1", output: "2"}
  format: auto
task: causal-lm
method: {type: prompt, prompt: {numVirtualTokens: 8, initText: Classify}}
output: {uri: ./outputs/x}
"""

CLASSIFY_YAML = """
model: {source: hf://distilbert/distilbert-base-uncased}
dataset:
  source: hf://datasets/stanfordnlp/imdb
  format: classification
  labels: [neg, pos]
  validation: {splitRatio: 0.2}
task: sequence-classification
method: {type: lora}
training: {earlyStopping: {metric: eval_accuracy}}
output: {uri: pvc://out/imdb, mergeAdapter: true}
"""


def with_(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of `base` with the dotted `path` set to `value` (parents created)."""
    out = copy.deepcopy(base)
    node = out
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return out


def errors_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_run_config(data)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


def paths_of(errors: list[str]) -> set[str]:
    return {line.split(": ", 1)[0] for line in errors}


# --------------------------------------------------------------------------------------------
# round trip and wire format
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text", [FULL_YAML, INLINE_YAML, CLASSIFY_YAML], ids=["full", "inline", "cls"]
)
def test_yaml_round_trip(text: str) -> None:
    config = parse_run_config(yaml.safe_load(text))
    wire = config.model_dump(by_alias=True, exclude_none=True)
    again = RunConfig.model_validate(yaml.safe_load(yaml.safe_dump(wire)))
    assert again == config
    assert again.model_dump(by_alias=True, exclude_none=True) == wire


def test_input_fields_survive_the_round_trip() -> None:
    given = yaml.safe_load(FULL_YAML)
    wire = parse_run_config(given).model_dump(by_alias=True, exclude_none=True, mode="json")

    def contained(small: Any, big: Any) -> bool:
        if isinstance(small, dict):
            return all(k in big and contained(v, big[k]) for k, v in small.items())
        return bool(small == big)

    assert contained(given, wire)


def test_wire_format_is_camel_case() -> None:
    wire = parse_run_config(yaml.safe_load(FULL_YAML)).model_dump(by_alias=True)

    def keys(node: Any) -> set[str]:
        if isinstance(node, dict):
            return set(node) | {k for v in node.values() for k in keys(v)}
        if isinstance(node, list):
            return {k for v in node for k in keys(v)}
        return set()

    assert not {k for k in keys(wire) if "_" in k}
    assert {"maxSeqLength", "completionOnlyLoss", "targetModules", "learningRate"} <= keys(wire)
    assert wire["training"]["earlyStopping"]["patience"] == 2
    assert run_field_names() == {
        "model",
        "dataset",
        "task",
        "method",
        "training",
        "evaluation",
        "output",
        "tracking",
    }


def test_values_keep_their_types() -> None:
    config = parse_run_config(yaml.safe_load(FULL_YAML))
    assert config.training.learning_rate == pytest.approx(2e-4)
    assert config.training.batch_size == "auto"
    assert config.training.epochs == 2
    assert config.training.gradient_checkpointing is True
    assert config.method.lora is not None
    assert config.method.lora.target_modules == ["q_proj", "v_proj"]


# --------------------------------------------------------------------------------------------
# defaults
# --------------------------------------------------------------------------------------------
def test_defaults_of_a_minimal_config() -> None:
    config = parse_run_config(BASE)
    assert config.task == "causal-lm"
    assert config.method.type == "lora"
    assert config.method.lora == LoraSpec()
    assert config.method.lora.target_modules == ["all-linear"]
    assert config.method.quantization is None
    t = config.training
    assert (t.epochs, t.learning_rate, t.batch_size, t.gradient_checkpointing) == ("auto",) * 4
    assert t.precision == "auto"
    assert config.dataset.format == "auto"
    assert config.dataset.completion_only_loss is None
    assert config.model.trust_remote_code is False
    assert config.output.merge_adapter is False


def test_qlora_defaults_to_4bit_nf4() -> None:
    config = parse_run_config(with_(BASE, "method", {"type": "qlora"}))
    q = config.method.quantization
    assert q == QuantizationSpec()
    assert q is not None
    assert (q.bits, q.quant_type, q.double_quant) == (4, "nf4", True)
    assert config.method.lora == LoraSpec()


def test_explicit_quantization_is_kept_for_qlora() -> None:
    config = parse_run_config(with_(BASE, "method", {"type": "qlora", "quantization": {"bits": 8}}))
    assert config.method.quantization is not None
    assert config.method.quantization.bits == 8


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_lora_methods_get_a_lora_spec(method: str) -> None:
    assert parse_run_config(with_(BASE, "method", {"type": method})).method.lora == LoraSpec()


@pytest.mark.parametrize("method", ["full", "ia3"])
def test_other_methods_get_no_adapter_sections(method: str) -> None:
    m = parse_run_config(with_(BASE, "method", {"type": method})).method
    assert (m.lora, m.quantization, m.prefix, m.prompt) == (None, None, None, None)


def test_prefix_and_prompt_get_their_sections() -> None:
    assert parse_run_config(with_(BASE, "method", {"type": "prefix"})).method.prefix is not None
    prompt = parse_run_config(with_(BASE, "method", {"type": "prompt"})).method.prompt
    assert prompt is not None
    assert prompt.num_virtual_tokens == 20


def test_lora_with_quantization_is_allowed() -> None:
    config = parse_run_config(with_(BASE, "method", {"type": "lora", "quantization": {}}))
    assert config.method.quantization is not None


def test_importing_the_config_does_not_import_torch() -> None:
    code = textwrap.dedent(
        """
        import sys
        import finetune_trainer.config
        import finetune_operator.api
        import finetune_operator.crd
        heavy = sorted(m for m in ("torch", "transformers", "peft", "trl") if m in sys.modules)
        print(",".join(heavy))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""


# --------------------------------------------------------------------------------------------
# errors name the field
# --------------------------------------------------------------------------------------------
INVALID: list[tuple[str, str, Any, str]] = [
    # (id, dotted path to set, value, the field path the error must name)
    ("unknown-top", "bogus", 1, "bogus"),
    ("unknown-model", "model.bogus", 1, "model.bogus"),
    ("unknown-lora", "method.lora.bogus", 1, "method.lora.bogus"),
    ("unknown-early-stop", "training.earlyStopping.bogus", 1, "training.earlyStopping.bogus"),
    ("snake-and-camel-typo", "dataset.maxSeqLen", 128, "dataset.maxSeqLen"),
    ("lora-r-0", "method.lora.r", 0, "method.lora.r"),
    ("lora-r-big", "method.lora.r", 4096, "method.lora.r"),
    ("lora-dropout-1", "method.lora.dropout", 1.0, "method.lora.dropout"),
    ("lr-0", "training.learningRate", 0, "training.learningRate"),
    ("lr-big", "training.learningRate", 2.0, "training.learningRate"),
    ("lr-word", "training.learningRate", "fast", "training.learningRate"),
    ("warmup", "training.warmupRatio", 0.9, "training.warmupRatio"),
    ("batch-0", "training.batchSize", 0, "training.batchSize"),
    ("epochs-0", "training.epochs", 0, "training.epochs"),
    ("epochs-word", "training.epochs", "many", "training.epochs"),
    ("ckpt-word", "training.gradientCheckpointing", "maybe", "training.gradientCheckpointing"),
    ("max-seq", "dataset.maxSeqLength", 8, "dataset.maxSeqLength"),
    ("split-ratio", "dataset.validation", {"splitRatio": 0.9}, "dataset.validation.splitRatio"),
    ("bad-method", "method.type", "lorax", "method.type"),
    ("bad-task", "task", "seq2seq", "task"),
    ("bad-format", "dataset.format", "xml", "dataset.format"),
    ("bad-bits", "method.quantization", {"bits": 3}, "method.quantization.bits"),
    ("bad-scheme", "model.source", "ftp://host/model", "model.source"),
    ("scheme-only", "output.uri", "s3://", "output.uri"),
    ("empty-source", "model.source", "", "model.source"),
    ("neither", "dataset", {"format": "alpaca"}, "dataset.source"),
    (
        "both",
        "dataset",
        {"source": "s3://b/t.jsonl", "inline": [{"text": "x"}]},
        "dataset.source",
    ),
    (
        "split-both",
        "dataset.validation",
        {"source": "s3://b/v.jsonl", "splitRatio": 0.1},
        "dataset.validation.source",
    ),
    ("split-neither", "dataset.test", {}, "dataset.test.source"),
    (
        "mix-fraction-0",
        "dataset.mix",
        [{"source": "s3://b/g", "fraction": 0}],
        "dataset.mix[0].fraction",
    ),
    ("mix-no-source", "dataset.mix", [{"fraction": 0.1}], "dataset.mix[0].source"),
    ("mix-empty", "dataset.mix", [], "dataset.mix"),
    ("lora-on-full", "method", {"type": "full", "lora": {"r": 8}}, "method.lora"),
    ("prefix-on-lora", "method", {"type": "lora", "prefix": {}}, "method.prefix"),
    ("prompt-on-prefix", "method", {"type": "prefix", "prompt": {}}, "method.prompt"),
    ("quant-on-full", "method", {"type": "full", "quantization": {}}, "method.quantization"),
    (
        "all-linear-mixed",
        "method.lora",
        {"targetModules": ["all-linear", "q_proj"]},
        "method.lora.targetModules",
    ),
    ("no-targets", "method.lora", {"targetModules": []}, "method.lora.targetModules"),
    ("dpo-beta-0", "training", {"objective": "dpo", "dpo": {"beta": 0}}, "training.dpo.beta"),
    ("dpo-beta-big", "training", {"objective": "dpo", "dpo": {"beta": 11}}, "training.dpo.beta"),
    (
        "dpo-loss",
        "training",
        {"objective": "dpo", "dpo": {"lossType": "ppo"}},
        "training.dpo.lossType",
    ),
    (
        "orpo-lambda-0",
        "training",
        {"objective": "orpo", "orpo": {"lambda": 0}},
        "training.orpo.lambda",
    ),
    ("objective-unknown", "training", {"objective": "rlhf"}, "training.objective"),
    (
        "inline-unknown",
        "dataset",
        {"inline": [{"text": "a"}, {"txt": "b"}]},
        "dataset.inline[1].txt",
    ),
    (
        "inline-role",
        "dataset",
        {"inline": [{"messages": [{"role": "robot", "content": "x"}]}]},
        "dataset.inline[0].messages[0].role",
    ),
]


@pytest.mark.parametrize(
    ("path", "value", "expected"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_field_is_named(path: str, value: Any, expected: str) -> None:
    errors = errors_of(with_(BASE, path, value))
    assert paths_of(errors) == {expected}, errors


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("trainig", "unknown field; did you mean training?"),
        ("training.learningrate", "unknown field; did you mean learningRate?"),
        ("dataset.maxSeqLen", "unknown field; did you mean maxSeqLength?"),
        ("method.lora.targetModule", "unknown field; did you mean targetModules?"),
        ("training.earlyStopping.patiense", "unknown field; did you mean patience?"),
        ("method.lora.rank", "unknown field"),
        ("model.bogus", "unknown field"),
    ],
)
def test_unknown_field_suggests_the_closest_field_of_the_same_object(
    path: str, message: str
) -> None:
    assert errors_of(with_(BASE, path, 1)) == [f"{path}: {message}"]


def test_unknown_field_in_a_list_item_suggests_the_items_field() -> None:
    errors = errors_of(with_(BASE, "dataset", {"inline": [{"text": "a"}, {"txt": "b"}]}))
    assert "dataset.inline[1].txt: unknown field; did you mean text?" in errors


CROSS_FIELD: list[tuple[str, dict[str, Any], str, str]] = [
    # (id, overrides of BASE sections, field path, words in the message)
    (
        "mix-classification",
        {
            "task": "sequence-classification",
            "dataset": {"source": "s3://b/t", "mix": [{"source": "s3://b/g", "fraction": 0.5}]},
        },
        "dataset.mix",
        "only for task causal-lm",
    ),
    (
        "generation-eval-no-held-out",
        {"evaluation": {"generation": {}}},
        "evaluation.generation",
        "set dataset.validation or dataset.test",
    ),
    (
        "generation-eval-text",
        {
            "dataset": {"source": "s3://b/t", "format": "text", "test": {"source": "s3://b/x"}},
            "evaluation": {"generation": {"examples": 4}},
        },
        "evaluation.generation",
        "text has no prompt to answer",
    ),
    (
        "generation-eval-classification",
        {
            "task": "sequence-classification",
            "dataset": {"source": "s3://b/t", "validation": {"splitRatio": 0.1}},
            "evaluation": {"generation": {}},
        },
        "evaluation.generation",
        "only for task causal-lm",
    ),
    (
        "completion-only-text",
        {"dataset": {"source": "s3://b/t", "format": "text", "completionOnlyLoss": True}},
        "dataset.completionOnlyLoss",
        "plain text",
    ),
    (
        "classification-causal",
        {"dataset": {"source": "s3://b/t", "format": "classification"}},
        "dataset.format",
        "needs task sequence-classification",
    ),
    (
        "seqcls-chat",
        {"task": "sequence-classification", "dataset": {"source": "s3://b/t", "format": "chat"}},
        "dataset.format",
        "needs classification data",
    ),
    (
        "seqcls-packing",
        {"task": "sequence-classification", "dataset": {"source": "s3://b/t", "packing": True}},
        "dataset.packing",
        "not used",
    ),
    (
        "merge-prefix",
        {"method": {"type": "prefix"}, "output": {"uri": "pvc://o/r", "mergeAdapter": True}},
        "output.mergeAdapter",
        "prefix run has no adapter",
    ),
    (
        "merge-full",
        {"method": {"type": "full"}, "output": {"uri": "pvc://o/r", "mergeAdapter": True}},
        "output.mergeAdapter",
        "full run",
    ),
    ("eval-steps-no-val", {"training": {"evalSteps": 10}}, "training.evalSteps", "validation"),
    (
        "early-stop-no-val",
        {"training": {"earlyStopping": {}}},
        "training.earlyStopping",
        "validation",
    ),
    (
        "accuracy-causal",
        {
            "training": {"earlyStopping": {"metric": "eval_accuracy"}},
            "dataset": {"source": "s3://b/t", "validation": {"splitRatio": 0.1}},
        },
        "training.earlyStopping.metric",
        "sequence-classification",
    ),
    (
        "labels-chat",
        {"dataset": {"source": "s3://b/t", "format": "chat", "labels": ["a", "b"]}},
        "dataset.labels",
        "classification",
    ),
    (
        "labels-dup",
        {
            "task": "sequence-classification",
            "dataset": {"source": "s3://b/t", "labels": ["a", "a"]},
        },
        "dataset.labels",
        "duplicates",
    ),
    (
        "preference-padding-free",
        {"dataset": {"source": "s3://b/t", "paddingFree": True}, "training": {"objective": "dpo"}},
        "dataset.paddingFree",
        "not used by objective dpo",
    ),
    (
        "preference-data-sft",
        {"dataset": {"source": "s3://b/t", "format": "preference"}},
        "training.objective",
        "needs objective dpo or orpo",
    ),
    (
        "orpo-on-classification",
        {"task": "sequence-classification", "training": {"objective": "orpo"}},
        "training.objective",
        "causal-lm only",
    ),
]


def test_preference_objectives_get_their_settings() -> None:
    dpo = RunConfig.model_validate({**BASE, "training": {"objective": "dpo"}})
    assert dpo.preference and dpo.training.dpo is not None and dpo.training.orpo is None
    assert (dpo.training.dpo.beta, dpo.training.dpo.loss_type) == (0.1, "sigmoid")
    orpo = RunConfig.model_validate(
        {**BASE, "training": {"objective": "orpo", "orpo": {"lambda": 0.5}}}
    )
    assert orpo.training.orpo is not None and orpo.training.orpo.lambda_ == 0.5
    wire = orpo.model_dump(by_alias=True, exclude_none=True)["training"]
    assert wire["orpo"] == {"lambda": 0.5} and "dpo" not in wire
    sft = RunConfig.model_validate(BASE)
    assert sft.training.objective == "sft" and not sft.preference


@pytest.mark.parametrize(
    ("overrides", "expected", "words"),
    [c[1:] for c in CROSS_FIELD],
    ids=[c[0] for c in CROSS_FIELD],
)
def test_cross_field_error_is_named(overrides: dict[str, Any], expected: str, words: str) -> None:
    errors = errors_of({**BASE, **overrides})
    assert len(errors) == 1, errors
    path, message = errors[0].split(": ", 1)
    assert path == expected
    assert words in message


def test_several_errors_are_all_reported() -> None:
    data = with_(with_(BASE, "method.lora", {"r": 0}), "training.warmupRatio", 0.9)
    assert paths_of(errors_of(data)) == {"method.lora.r", "training.warmupRatio"}


def test_prefix_is_prepended() -> None:
    with pytest.raises(ConfigError) as info:
        parse_run_config(with_(BASE, "method.lora.r", 0), prefix="run")
    assert info.value.errors[0].startswith("run.method.lora.r: ")


def test_missing_required_sections_are_named() -> None:
    assert paths_of(errors_of({"model": {"source": "x"}})) == {"dataset", "output"}


def test_local_paths_and_known_schemes_are_accepted() -> None:
    for uri in ("./out", "/abs/out", "file:///tmp/out", "hf://org/repo", "gs://b/p", "az://c/p"):
        assert parse_run_config(with_(BASE, "output.uri", uri)).output.uri == uri


@pytest.mark.parametrize(
    ("tracking", "error"),
    [
        (
            {"mlflow": {"trackingUri": "mlflow:5000", "experiment": "e"}},
            "tracking.mlflow.trackingUri: 'mlflow:5000' is not an MLflow tracking server: use "
            "http(s)://host[:port][/path]",
        ),
        (  # credentials never go in the spec: spec.secrets.mlflow holds them
            {"mlflow": {"trackingUri": "https://bob:hunter2@mlflow:5000", "experiment": "e"}},
            "tracking.mlflow.trackingUri: credentials do not belong in the URI: put "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in a "
            "Secret named by spec.secrets.mlflow",
        ),
        (
            {"mlflow": {"trackingUri": "file:///tmp/mlruns", "experiment": "e"}},
            "tracking.mlflow.trackingUri: 'file:///tmp/mlruns' is not an MLflow tracking server",
        ),
        (
            {"mlflow": {"trackingUri": "http://m:5000"}},
            "tracking.mlflow.experiment: Field required",
        ),
        ({"wandb": {"project": "a/b"}}, "tracking.wandb.project: String should match pattern"),
        ({"wandb": {"project": "p", "mode": "cloud"}}, "tracking.wandb.mode: Input should be"),
        ({}, "tracking: set at least one of mlflow, wandb or tensorboard: true"),
        ({"tensorboard": "yes please"}, "tracking.tensorboard: Input should be a valid boolean"),
    ],
)
def test_tracking_errors_name_the_field(tracking: dict[str, Any], error: str) -> None:
    doc = {"model": {"source": "m"}, "dataset": {"source": "d.jsonl"}, "output": {"uri": "o"}}
    with pytest.raises(ConfigError) as info:
        parse_run_config({**doc, "tracking": tracking})
    assert any(line.startswith(error) for line in info.value.errors), info.value.errors
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    "uri", ["http://mlflow.mlflow.svc:5000", "https://mlflow.example.com/team", "databricks"]
)
def test_tracking_server_uris(uri: str) -> None:
    doc = {"model": {"source": "m"}, "dataset": {"source": "d.jsonl"}, "output": {"uri": "o"}}
    run = parse_run_config({**doc, "tracking": {"mlflow": {"trackingUri": uri, "experiment": "e"}}})
    assert run.tracking is not None and run.tracking.enabled() == ["mlflow"]
