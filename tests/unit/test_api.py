"""The FineTuneJob API (finetune_operator.api): spec = run config + placement, and status."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml
from finetune_operator.api import (
    ConfigError,
    FineTuneJobSpec,
    FineTuneJobStatus,
    parse_spec,
)
from finetune_trainer.config import RunConfig

SPEC: dict[str, Any] = {
    "model": {"source": "hf://Qwen/Qwen2.5-0.5B"},
    "dataset": {"source": "s3://bucket/train.jsonl"},
    "output": {"uri": "pvc://outputs/run1"},
}

PLACED_YAML = """
model: {source: hf://meta-llama/Llama-3.2-1B, revision: main}
dataset: {source: pvc://data/train.jsonl, format: alpaca, validation: {splitRatio: 0.05}}
method: {type: qlora, lora: {r: 32, alpha: 64}}
training: {epochs: auto, learningRate: 0.0001, batchSize: 4, evalSteps: 100}
output: {uri: s3://bucket/runs/llama-qlora, mergeAdapter: true}
resources:
  gpus: 1
  gpuType: NVIDIA-A100-SXM4-80GB
  cpu: "8"
  memory: 64Gi
  shmSize: 16Gi
  nodeSelector: {pool: gpu}
  tolerations:
    - {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}
  image: registry.example/finetune-trainer:0.1.0
secrets:
  hfToken: {name: hf-token, key: token}
  storage: {name: s3-credentials}
suspend: false
ttlSecondsAfterFinished: 3600
activeDeadlineSeconds: 86400
backoffLimit: 2
priorityClassName: training-low
queueName: team-a
"""


def with_(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(base)
    node = out
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return out


def spec_errors(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_spec(data)
    return info.value.errors


def paths_of(errors: list[str]) -> set[str]:
    return {line.split(": ", 1)[0] for line in errors}


# --------------------------------------------------------------------------------------------
# round trip
# --------------------------------------------------------------------------------------------
def test_spec_yaml_round_trip() -> None:
    spec = parse_spec(yaml.safe_load(PLACED_YAML))
    wire = spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    assert FineTuneJobSpec.model_validate(yaml.safe_load(yaml.safe_dump(wire))) == spec
    assert wire["resources"]["gpuType"] == "NVIDIA-A100-SXM4-80GB"
    assert wire["secrets"]["hfToken"] == {"name": "hf-token", "key": "token"}
    assert wire["ttlSecondsAfterFinished"] == 3600
    assert wire["resources"]["tolerations"][0]["operator"] == "Exists"


def test_placement_defaults() -> None:
    spec = parse_spec(SPEC)
    assert spec.resources.gpus == 1
    assert spec.suspend is False
    assert spec.backoff_limit == 3
    assert spec.secrets is None
    assert spec.queue_name is None


def test_secret_key_defaults_to_token() -> None:
    spec = parse_spec(with_(SPEC, "secrets", {"hfToken": {"name": "hf"}}))
    assert spec.secrets is not None
    assert spec.secrets.hf_token is not None
    assert spec.secrets.hf_token.key == "token"


def test_run_config_is_the_training_part() -> None:
    spec = parse_spec(yaml.safe_load(PLACED_YAML))
    run = spec.run_config()
    assert type(run) is RunConfig
    assert run.method == spec.method
    assert run.training == spec.training
    assert run.output == spec.output
    assert "resources" not in run.model_dump(by_alias=True)


def test_every_run_config_field_is_a_spec_field() -> None:
    assert set(RunConfig.model_fields) <= set(FineTuneJobSpec.model_fields)


# --------------------------------------------------------------------------------------------
# errors: `spec.` + the field path
# --------------------------------------------------------------------------------------------
INVALID: list[tuple[str, str, Any, str]] = [
    ("unknown-top", "bogus", 1, "spec.bogus"),
    ("unknown-model", "model.bogus", 1, "spec.model.bogus"),
    ("unknown-resources", "resources.gpu", 1, "spec.resources.gpu"),
    (
        "unknown-secret",
        "secrets.hfToken",
        {"name": "a", "value": "x"},
        "spec.secrets.hfToken.value",
    ),
    (
        "unknown-deep",
        "method.quantization",
        {"bits": 4, "kind": "x"},
        "spec.method.quantization.kind",
    ),
    ("lora-r", "method.lora.r", 0, "spec.method.lora.r"),
    ("lr", "training.learningRate", -1e-4, "spec.training.learningRate"),
    ("warmup", "training.warmupRatio", 0.51, "spec.training.warmupRatio"),
    ("batch-0", "training.batchSize", 0, "spec.training.batchSize"),
    ("enum", "training.precision", "fp8", "spec.training.precision"),
    ("scheme", "dataset.source", "ftp://x/y", "spec.dataset.source"),
    ("both", "dataset.inline", [{"text": "x"}], "spec.dataset.source"),
    (
        "split-both",
        "dataset.validation",
        {"splitRatio": 0.1, "source": "x"},
        "spec.dataset.validation.source",
    ),
    ("lora-on-full", "method", {"type": "full", "lora": {}}, "spec.method.lora"),
    ("prefix-on-lora", "method", {"type": "lora", "prefix": {}}, "spec.method.prefix"),
    ("quant-on-full", "method", {"type": "full", "quantization": {}}, "spec.method.quantization"),
    (
        "all-linear",
        "method.lora.targetModules",
        ["all-linear", "o_proj"],
        "spec.method.lora.targetModules",
    ),
    ("eval-no-val", "training.evalSteps", 5, "spec.training.evalSteps"),
    ("gpus-neg", "resources.gpus", -1, "spec.resources.gpus"),
    ("gpus-big", "resources.gpus", 65, "spec.resources.gpus"),
    ("qlora-cpu", "method", {"type": "qlora"}, "spec.resources.gpus"),  # gpus set below
    ("local-output", "output.uri", "./outputs/run1", "spec.output.uri"),
    ("file-output", "output.uri", "file:///tmp/out", "spec.output.uri"),
    ("http-output", "output.uri", "https://example.com/x", "spec.output.uri"),
    ("memory-word", "resources.memory", "lots", "spec.resources.memory"),
    ("memory-bytes-suffix", "resources.memory", "8GB", "spec.resources.memory"),
    ("memory-lower-binary", "resources.memory", "8gi", "spec.resources.memory"),
    ("memory-milli-binary", "resources.memory", "8mi", "spec.resources.memory"),
    ("cpu-negative", "resources.cpu", "-1", "spec.resources.cpu"),
    ("shm-space", "resources.shmSize", "8 Gi", "spec.resources.shmSize"),
    ("secret-name", "secrets.storage", {"name": "Bad_Name"}, "spec.secrets.storage.name"),
    ("queue-name", "queueName", "Team-A", "spec.queueName"),
    ("priority-empty", "priorityClassName", "", "spec.priorityClassName"),
    ("ttl-neg", "ttlSecondsAfterFinished", -1, "spec.ttlSecondsAfterFinished"),
    ("deadline-0", "activeDeadlineSeconds", 0, "spec.activeDeadlineSeconds"),
    ("backoff-big", "backoffLimit", 101, "spec.backoffLimit"),
    (
        "toleration-op",
        "resources.tolerations",
        [{"operator": "Maybe"}],
        "spec.resources.tolerations[0].operator",
    ),
    ("suspend-word", "suspend", "later", "spec.suspend"),
]


@pytest.mark.parametrize(
    ("path", "value", "expected"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_spec_field_is_named(path: str, value: Any, expected: str) -> None:
    data = with_(SPEC, path, value)
    if path == "method" and value == {"type": "qlora"}:
        data = with_(data, "resources.gpus", 0)
    errors = spec_errors(data)
    assert paths_of(errors) == {expected}, errors
    assert all(line.startswith("spec.") for line in errors)


@pytest.mark.parametrize(
    "method",
    [{"type": "qlora"}, {"type": "lora", "quantization": {"bits": 4}}],
    ids=["qlora", "lora-quantized"],
)
def test_kbit_training_runs_one_worker_per_gpu(method: dict[str, Any]) -> None:
    """Each DDP worker loads its own quantized base on its own GPU: several GPUs are fine."""
    spec = parse_spec(with_(with_(SPEC, "method", method), "resources", {"gpus": 8, "nodes": 2}))
    assert (spec.resources.workers, spec.resources.workers_per_pod) == (16, 8)


def test_fsdp_needs_more_than_one_worker() -> None:
    fsdp = with_(SPEC, "training.distributed", {"strategy": "fsdp"})
    assert spec_errors(with_(fsdp, "resources.gpus", 1)) == [
        "spec.training.distributed.strategy: fsdp shards over several workers; set "
        "resources.gpus or resources.nodes so the run has more than one (or use ddp / auto)"
    ]
    assert parse_spec(with_(fsdp, "resources", {"gpus": 0, "nodes": 2})).resources.workers == 2


def test_gpus_over_all_nodes_count_against_the_platform_maximum() -> None:
    from finetune_operator.policy import Policy, check_policy

    spec = parse_spec(with_(SPEC, "resources", {"gpus": 8, "nodes": 2}))
    assert check_policy(spec, "default", Policy(max_gpus_per_job=16)) == []
    assert check_policy(spec, "default", Policy(max_gpus_per_job=8)) == [
        "spec.resources.nodes: 16 GPUs (2 pods x 8) exceeds the platform maximum of 8 per job"
    ]


def test_unknown_spec_field_suggests_the_closest_one() -> None:
    errors = spec_errors(with_(SPEC, "resorces", {"gpus": 1}))
    assert errors == ["spec.resorces: unknown field; did you mean resources?"]
    errors = spec_errors(with_(SPEC, "resources.gpu", 1))
    assert errors == ["spec.resources.gpu: unknown field; did you mean gpus?"]


def test_qlora_with_a_gpu_is_fine() -> None:
    spec = parse_spec(with_(with_(SPEC, "method", {"type": "qlora"}), "resources.gpus", 1))
    assert spec.method.quantization is not None


@pytest.mark.parametrize(
    "uri",
    ["pvc://c/p", "s3://b/p", "gs://b/p", "gcs://b/p", "az://c/p", "abfs://c/p", "hf://org/repo"],
)
def test_durable_outputs_are_accepted(uri: str) -> None:
    assert parse_spec(with_(SPEC, "output.uri", uri)).output.uri == uri


@pytest.mark.parametrize(
    "quantity", ["1", "500m", "0.5", "32Gi", "1Ei", "2k", "1e3", "1.5G", "100u"]
)
def test_quantities_are_accepted(quantity: str) -> None:
    assert parse_spec(with_(SPEC, "resources.memory", quantity)).resources.memory == quantity


def test_spec_and_run_config_agree_on_run_errors() -> None:
    from finetune_trainer.config import parse_run_config

    data = with_(SPEC, "method.lora.alpha", 0)
    with pytest.raises(ConfigError) as run_info:
        parse_run_config(data)
    assert spec_errors(data) == [f"spec.{line}" for line in run_info.value.errors]


# --------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------
STATUS_WIRE: dict[str, Any] = {
    "phase": "Running",
    "conditions": [
        {
            "type": "Running",
            "status": "True",
            "reason": "Training",
            "message": "step 10/100",
            "lastTransitionTime": "2025-01-01T00:00:00Z",
            "observedGeneration": 1,
        }
    ],
    "progress": {
        "step": 10,
        "totalSteps": 100,
        "percent": 10.0,
        "loss": 1.5,
        "etaSeconds": 90.0,
        "eta": "1m30s",
    },
    "checkpoints": [{"step": 10, "uri": "pvc://o/r/checkpoint-10", "time": "2025-01-01T00:01:00Z"}],
    "startTime": "2025-01-01T00:00:00Z",
    "attempts": 1,
    "observedGeneration": 1,
}


def test_status_round_trip() -> None:
    status = FineTuneJobStatus.model_validate(STATUS_WIRE)
    assert status.conditions[0].last_transition_time == datetime(2025, 1, 1, tzinfo=UTC)
    assert status.progress is not None
    assert status.progress.total_steps == 100
    wire = status.model_dump(by_alias=True, exclude_none=True, mode="json")
    assert FineTuneJobStatus.model_validate(wire) == status
    assert wire["progress"]["etaSeconds"] == 90.0
    assert wire["conditions"][0]["lastTransitionTime"].startswith("2025-01-01T00:00:00")


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("phase", "Exploding"),
        ("progress.percent", 101),
        ("attempts", -1),
    ],
)
def test_status_rejects_bad_values(path: str, value: Any) -> None:
    with pytest.raises(ValueError, match=path.split(".")[-1]):
        FineTuneJobStatus.model_validate(with_(STATUS_WIRE, path, value))


def test_condition_reason_must_be_camel_case_word() -> None:
    bad = copy.deepcopy(STATUS_WIRE)
    bad["conditions"][0]["reason"] = "not a reason"
    with pytest.raises(ValueError, match="reason"):
        FineTuneJobStatus.model_validate(bad)
