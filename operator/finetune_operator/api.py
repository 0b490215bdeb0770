"""The FineTuneJob API (finetune.dev/v1alpha1): spec = run config + placement, and status.

These models are the single source of truth: the CRD is rendered from them
(`python -m finetune_operator.crd`) and the operator parses every object with them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from finetune_trainer.config import (
    ConfigError,
    RunConfig,
    SpecModel,
    format_errors,
    run_field_names,
)
from finetune_trainer.progress import CheckpointInfo, Estimate, TrackerInfo, WireModel
from pydantic import Field, ValidationError, model_validator

GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
CATEGORIES = ["finetune"]

Quantity = Annotated[
    str,
    Field(
        max_length=64,
        pattern=r"^[0-9]+(\.[0-9]+)?([eE][0-9]+|[KMGTPE]i|[numkMGTPE])?$",
        description="A Kubernetes quantity, e.g. 8, 500m, 32Gi.",
    ),
]
LabelValue = Annotated[str, Field(max_length=253)]
K8sName = Annotated[
    str, Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
]


KBIT_NEEDS_GPU = (
    "resources.gpus: k-bit loading (qlora, or method.quantization) needs a GPU "
    "(bitsandbytes k-bit kernels); set gpus: 1"
)
FSDP_NEEDS_WORKERS = (
    "training.distributed.strategy: fsdp shards over several workers; set resources.gpus or "
    "resources.nodes so the run has more than one (or use ddp / auto)"
)
NODE_SHARDING_NEEDS_GROUP = (
    "training.distributed.fsdp.sharding: node shards within a pod and replicates across "
    "pods; it needs resources.nodes > 1 and resources.gpus > 1 (else use global)"
)


class Toleration(SpecModel):
    """A pod toleration (core/v1 Toleration)."""

    key: str | None = Field(default=None, max_length=316)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(default=None, max_length=253)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, ge=0)


class ResourcesSpec(SpecModel):
    """Where the trainer pod runs and what it gets."""

    gpus: int = Field(
        default=1,
        ge=0,
        le=64,
        description="nvidia.com/gpu per pod; one worker process per GPU (one per pod on CPU).",
    )
    nodes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Pods of the run (an Indexed Job; several pods train as one group).",
    )
    gpu_type: str | None = Field(
        default=None,
        max_length=253,
        description="Value of the node label nvidia.com/gpu.product to schedule on.",
    )
    cpu: Quantity | None = Field(default=None, description="CPU request (and limit).")
    memory: Quantity | None = Field(default=None, description="Memory request (and limit).")
    node_selector: dict[str, LabelValue] | None = Field(default=None, max_length=32)
    tolerations: list[Toleration] | None = Field(default=None, max_length=32)
    image: str | None = Field(
        default=None, max_length=1024, description="Trainer image; default set by the platform."
    )
    shm_size: Quantity | None = Field(
        default=None, description="Size of /dev/shm (memory-backed emptyDir); default 8Gi."
    )

    @property
    def workers_per_pod(self) -> int:
        """Worker processes in each pod: one per GPU, one on a CPU-only pod."""
        return max(self.gpus, 1)

    @property
    def workers(self) -> int:
        """Worker processes of the whole run (the world size)."""
        return self.nodes * self.workers_per_pod


class SecretKeyRef(SpecModel):
    """A key in a Secret in the job's namespace."""

    name: K8sName
    key: str = Field(default="token", min_length=1, max_length=253)


class SecretRef(SpecModel):
    """A Secret in the job's namespace, all of whose keys become environment variables."""

    name: K8sName


class SecretsSpec(SpecModel):
    """Credentials, referenced by name; never inlined in the spec."""

    hf_token: SecretKeyRef | None = Field(
        default=None, description="Hugging Face token (exposed to the trainer as HF_TOKEN)."
    )
    storage: SecretRef | None = Field(
        default=None,
        description="Object-store credentials (e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).",
    )
    mlflow: SecretRef | None = Field(
        default=None,
        description="MLflow credentials for tracking.mlflow: every key becomes an environment "
        "variable (MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD).",
    )
    wandb: SecretKeyRef | None = Field(
        default=None,
        description="Weights & Biases API key for tracking.wandb (exposed as WANDB_API_KEY).",
    )


WANDB_NEEDS_KEY = (
    "secrets.wandb: W&B online mode needs an API key: name the Secret that holds it "
    "(or set tracking.wandb.mode: offline)"
)
MLFLOW_SECRET_UNUSED = "secrets.mlflow: only used by tracking.mlflow"
WANDB_SECRET_UNUSED = "secrets.wandb: only used by tracking.wandb"

DURABLE_OUTPUT_SCHEMES = ("pvc://", "s3://", "gs://", "gcs://", "az://", "abfs://", "hf://")


class FineTuneJobSpec(RunConfig):
    """A FineTuneJob's spec: the training run plus where and how it runs on the cluster."""

    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    secrets: SecretsSpec | None = None
    suspend: bool = Field(
        default=False, description="Suspend the run (pods deleted, checkpoints kept)."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, le=31_536_000, description="Delete the finished job after this TTL."
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, le=31_536_000, description="Fail the run after this long."
    )
    backoff_limit: int = Field(
        default=3, ge=0, le=100, description="Retries on failure (preemptions not counted)."
    )
    priority_class_name: K8sName | None = None
    queue_name: K8sName | None = Field(
        default=None, description="Kueue LocalQueue; the Job is created suspended for Kueue."
    )

    @model_validator(mode="after")
    def _check_placement(self) -> FineTuneJobSpec:
        if self.method.quantization is not None and self.resources.gpus == 0:
            raise ValueError(KBIT_NEEDS_GPU)
        distributed = self.training.distributed
        if distributed.strategy == "fsdp" and self.resources.workers == 1:
            raise ValueError(FSDP_NEEDS_WORKERS)
        fsdp = distributed.fsdp
        if (
            fsdp is not None
            and fsdp.sharding == "node"
            and (self.resources.nodes == 1 or self.resources.gpus <= 1)
        ):
            raise ValueError(NODE_SHARDING_NEEDS_GROUP)
        self._check_tracking_secrets()
        if not self.output.uri.startswith(DURABLE_OUTPUT_SCHEMES):
            raise ValueError(
                "output.uri: a cluster run needs durable storage: pvc://claim/path, s3://... "
                "or hf://org/repo (a local path would be lost with the pod)"
            )
        return self

    def _check_tracking_secrets(self) -> None:
        """Tracker credentials: named where a tracker needs them, and only there."""
        tracking, secrets = self.tracking, self.secrets or SecretsSpec()
        mlflow = tracking.mlflow if tracking is not None else None
        wandb = tracking.wandb if tracking is not None else None
        if secrets.mlflow is not None and mlflow is None:
            raise ValueError(MLFLOW_SECRET_UNUSED)
        if secrets.wandb is not None and wandb is None:
            raise ValueError(WANDB_SECRET_UNUSED)
        if wandb is not None and wandb.mode == "online" and secrets.wandb is None:
            raise ValueError(WANDB_NEEDS_KEY)

    def run_config(self) -> RunConfig:
        """The training-run part of this spec, as the trainer receives it."""
        fields = run_field_names()
        return RunConfig.model_validate(
            {k: v for k, v in self.model_dump(by_alias=True).items() if k in fields}
        )


def parse_spec(spec: dict[str, Any]) -> FineTuneJobSpec:
    """Validate a FineTuneJob spec, raising ConfigError with `spec.`-prefixed field paths."""
    try:
        return FineTuneJobSpec.model_validate(spec)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, "spec", FineTuneJobSpec)) from None


# --------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------
JobPhase = Literal["Pending", "ValidatingData", "Running", "Succeeded", "Failed", "Suspended"]
ConditionType = Literal["Created", "Running", "Succeeded", "Failed", "Suspended", "Tracking"]


class Condition(WireModel):
    """A metav1.Condition-shaped condition."""

    type: ConditionType
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(
        min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
    )
    message: str = Field(default="", max_length=32768)
    last_transition_time: datetime
    observed_generation: int | None = Field(default=None, ge=0)


class ProgressStatus(WireModel):
    """Live training progress mirrored from the trainer's /progress."""

    stage: str | None = Field(default=None, description="Trainer phase, e.g. training, saving.")
    step: int | None = Field(default=None, ge=0)
    total_steps: int | None = Field(default=None, ge=0)
    epoch: float | None = None
    percent: float | None = Field(default=None, ge=0, le=100)
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    eta: str | None = Field(default=None, max_length=32, description="ETA for humans, e.g. 1h05m.")
    trained_tokens: int | None = Field(default=None, ge=0)
    updated_at: datetime | None = None


class ResultStatus(WireModel):
    """Where the outputs of a finished run are, and its final metrics."""

    adapter_uri: str | None = Field(default=None, description="The trained adapter (PEFT methods).")
    model_uri: str | None = Field(
        default=None, description="The trained model (a full fine-tune; it has no adapter)."
    )
    merged_model_uri: str | None = None
    output_uri: str | None = None
    metrics: dict[str, float] | None = None
    trainable_params: int | None = Field(default=None, ge=0)
    trained_tokens: int | None = Field(default=None, ge=0)
    tracking: list[TrackerInfo] | None = Field(
        default=None,
        max_length=3,
        description="The run in each experiment tracker (MLflow or W&B run page, TensorBoard "
        "event files).",
    )


class WorkersStatus(WireModel):
    """The pods of a run of several workers, and how many processes train."""

    ready: int = Field(ge=0, description="Pods whose trainer is running.")
    total: int = Field(ge=1, description="Pods of the run (spec.resources.nodes).")
    world_size: int = Field(ge=1, description="Worker processes over all pods.")


class FineTuneJobStatus(WireModel):
    """Observed state of a FineTuneJob, owned by the operator."""

    phase: JobPhase | None = None
    conditions: list[Condition] = Field(default_factory=list, max_length=16)
    progress: ProgressStatus | None = None
    estimate: Estimate | None = Field(
        default=None,
        description="The trainer's estimate before loading weights: worst-case peak GiB per "
        "GPU, whether it fits, steps, expected duration, GPU-hours (see docs/planning.md).",
    )
    checkpoints: list[CheckpointInfo] = Field(default_factory=list, max_length=32)
    result: ResultStatus | None = None
    tracking: list[TrackerInfo] | None = Field(
        default=None,
        max_length=3,
        description="Where spec.tracking's trackers show the run, from the start of training.",
    )
    start_time: datetime | None = None
    completion_time: datetime | None = None
    attempts: int | None = Field(default=None, ge=0)
    preemptions: int | None = Field(default=None, ge=0)
    job_name: str | None = Field(default=None, max_length=253)
    pod_name: str | None = Field(
        default=None, max_length=253, description="The trainer pod of the latest attempt."
    )
    workers: WorkersStatus | None = Field(
        default=None, description="Pods and worker processes, for a run of several workers."
    )
    observed_generation: int | None = Field(default=None, ge=0)


__all__ = [
    "API_VERSION",
    "CATEGORIES",
    "GROUP",
    "KIND",
    "PLURAL",
    "SHORT_NAMES",
    "SINGULAR",
    "VERSION",
    "Condition",
    "ConfigError",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "ProgressStatus",
    "ResultStatus",
    "parse_spec",
]
