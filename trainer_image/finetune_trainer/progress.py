"""The trainer -> operator contract (docs/contract.md): progress, final summary, exit codes.

Pure pydantic, no torch: the operator imports this module to read what the trainer reports.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

# Environment the operator sets on the trainer container (defaults are the in-cluster values).
ENV_CONFIG = "FINETUNE_CONFIG"  # path of the run-config JSON
ENV_PROGRESS_PORT = "FINETUNE_PROGRESS_PORT"  # port of GET /progress (0 disables the server)
ENV_TERMINATION_PATH = "FINETUNE_TERMINATION_MESSAGE_PATH"  # where the final summary goes
ENV_PVC_ROOT = "FINETUNE_PVC_ROOT"  # pvc://CLAIM/path resolves to $FINETUNE_PVC_ROOT/CLAIM/path
ENV_HF_TOKEN = "HF_TOKEN"  # Hugging Face token (from a referenced Secret)
ENV_WANDB_API_KEY = "WANDB_API_KEY"  # Weights & Biases API key (from a referenced Secret)
# The FineTuneJob the run belongs to (tags in experiment trackers)
ENV_JOB_NAME = "FINETUNE_JOB_NAME"
ENV_JOB_NAMESPACE = "FINETUNE_JOB_NAMESPACE"
ENV_JOB_UID = "FINETUNE_JOB_UID"
# A run of several workers (finetune_trainer.launch): torchrun's own variable names
ENV_NNODES = "PET_NNODES"  # pods in the group
ENV_NPROC_PER_NODE = "PET_NPROC_PER_NODE"  # workers per pod (one per GPU)
ENV_NODE_RANK = "PET_NODE_RANK"  # this pod's index (else JOB_COMPLETION_INDEX)
ENV_JOB_COMPLETION_INDEX = "JOB_COMPLETION_INDEX"  # set by the Job controller (Indexed Job)
ENV_MASTER_ADDR = "PET_MASTER_ADDR"  # pod 0's DNS name: where the launchers meet
ENV_MASTER_PORT = "PET_MASTER_PORT"  # and its port
ENV_RDZV_TIMEOUT = "FINETUNE_RDZV_TIMEOUT_SECONDS"  # how long pod 0 waits for the others
ENV_SHUTDOWN_TIMEOUT = "FINETUNE_SHUTDOWN_TIMEOUT_SECONDS"  # workers' time to save on a stop
ENV_MAX_GPU_HOURS = "FINETUNE_MAX_GPU_HOURS"  # the platform's cap on a job's estimated GPU-hours

CONFIG_PATH = "/etc/finetune/config.json"
PROGRESS_PORT = 8080
PROGRESS_PATH = "/progress"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
TERMINATION_MESSAGE_MAX_BYTES = 4096
PVC_ROOT = "/mnt/pvc"
MAX_REPORTED_CHECKPOINTS = 20


class ExitCode(IntEnum):
    """Trainer exit codes: the operator's podFailurePolicy keys on these."""

    SUCCEEDED = 0
    FAILED = 1
    INVALID_INPUT = 65  # bad config or dataset: permanent, never retried (EX_DATAERR)
    PREEMPTED = 75  # SIGTERM or Ctrl-C: retry; resumes from the last checkpoint (EX_TEMPFAIL)


class Phase(StrEnum):
    """What the trainer is doing now."""

    STARTING = "starting"
    VALIDATING_DATA = "validating-data"
    LOADING_MODEL = "loading-model"
    TRAINING = "training"
    EVALUATING = "evaluating"
    SAVING = "saving"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    PREEMPTED = "preempted"


class WireModel(BaseModel):
    """camelCase JSON models that tolerate fields added by newer trainers."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def to_json(self) -> str:
        """Compact camelCase JSON without unset optional fields."""
        return self.model_dump_json(by_alias=True, exclude_none=True)


def utcnow() -> datetime:
    """The current time, timezone-aware UTC, to the second."""
    return datetime.now(UTC).replace(microsecond=0)


class CheckpointInfo(WireModel):
    """A complete checkpoint in the output location."""

    step: int = Field(ge=0)
    uri: str
    eval_loss: float | None = None
    eval_accuracy: float | None = Field(
        default=None, description="Validation accuracy (sequence classification)."
    )
    time: datetime
    world_size: int | None = Field(
        default=None, ge=1, description="Workers that wrote it (a resume needs as many)."
    )
    best: bool = Field(
        default=False,
        description="The best checkpoint by training.earlyStopping.metric (default eval_loss).",
    )


class Estimate(WireModel):
    """What the trainer estimated before loading any weights (finetune_trainer.planning):
    the worst-case per-GPU peak memory, whether it fits this GPU, and the expected duration
    (a range from the trainer's measured throughput; absent when the GPU type is unknown)."""

    peak_gib_per_gpu: float = Field(ge=0, description="Worst-case peak memory per GPU (GiB).")
    gpu_gib: float | None = Field(default=None, ge=0, description="Memory of this run's GPU.")
    fits: bool | None = Field(default=None, description="The worst case fits the GPU.")
    batch_size: int | None = Field(default=None, ge=1, description="Per-GPU batch planned.")
    gradient_checkpointing: bool | None = None
    worst_case_tokens: int | None = Field(
        default=None, ge=0, description="Tokens of the largest micro-batch assumed."
    )
    total_steps: int | None = Field(default=None, ge=0)
    expected_seconds_min: float | None = Field(default=None, ge=0)
    expected_seconds_max: float | None = Field(default=None, ge=0)
    gpu_hours_max: float | None = Field(
        default=None, ge=0, description="GPU-hours at the slow end of the range."
    )


class TrackerInfo(WireModel):
    """Where an experiment tracker shows the run, and whether it still reports."""

    name: Literal["mlflow", "wandb", "tensorboard"]
    url: str | None = Field(default=None, description="The run's page (MLflow, W&B online).")
    location: str | None = Field(
        default=None, description="Files the tracker writes (TensorBoard events, W&B offline)."
    )
    error: str | None = Field(
        default=None,
        max_length=512,
        description="Why it stopped reporting (training went on without it).",
    )


class Progress(WireModel):
    """`GET /progress`: a live snapshot of the run."""

    phase: Phase = Phase.STARTING
    message: str | None = None
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    percent: float | None = Field(default=None, ge=0, le=100)
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    trained_tokens: int | None = None
    checkpoints: list[CheckpointInfo] = Field(default_factory=list)
    estimate: Estimate | None = None
    trackers: list[TrackerInfo] | None = None
    updated_at: datetime = Field(default_factory=utcnow)


class Outcome(StrEnum):
    """How a run ended."""

    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    INVALID_INPUT = "InvalidInput"
    PREEMPTED = "Preempted"


class Summary(WireModel):
    """The final summary written to the termination-message file (at most 4 KiB)."""

    outcome: Outcome
    reason: str | None = None
    message: str | None = None
    adapter_uri: str | None = None  # PEFT methods: the adapter
    model_uri: str | None = None  # a full fine-tune: the whole model
    merged_model_uri: str | None = None
    output_uri: str | None = None
    last_checkpoint: CheckpointInfo | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    trainable_params: int | None = None
    total_params: int | None = None
    trained_tokens: int | None = None
    steps: int | None = None
    trackers: list[TrackerInfo] | None = None

    def exit_code(self) -> ExitCode:
        """The exit code the operator expects for this outcome."""
        return {
            Outcome.SUCCEEDED: ExitCode.SUCCEEDED,
            Outcome.INVALID_INPUT: ExitCode.INVALID_INPUT,
            Outcome.PREEMPTED: ExitCode.PREEMPTED,
        }.get(self.outcome, ExitCode.FAILED)

    def to_termination_message(self) -> str:
        """Serialise within TERMINATION_MESSAGE_MAX_BYTES, shortening the message if needed."""
        text = self.to_json()
        if len(text.encode()) <= TERMINATION_MESSAGE_MAX_BYTES:
            return text
        overflow = len(text.encode()) - TERMINATION_MESSAGE_MAX_BYTES
        message = (self.message or "").encode()[: max(0, len(self.message or "") - overflow - 16)]
        short = self.model_copy(update={"message": message.decode(errors="ignore") + " [...]"})
        text = short.to_json()
        if len(text.encode()) > TERMINATION_MESSAGE_MAX_BYTES:
            text = short.model_copy(update={"metrics": {}, "message": None}).to_json()
        return text

    @classmethod
    def from_termination_message(cls, text: str | None) -> Summary | None:
        """Parse a termination message; None when absent or not ours (e.g. a crash trace)."""
        if not text:
            return None
        try:
            return cls.model_validate(json.loads(text))
        except (ValueError, TypeError):
            return None
