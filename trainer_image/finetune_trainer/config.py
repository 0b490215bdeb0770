"""The training-run configuration: what one fine-tuning run is.

Pydantic v2 models, camelCase on the wire, unknown fields rejected, numbers and lists bounded.
The operator embeds `RunConfig` in the FineTuneJob spec and renders the CRD from it, so every
constraint here is also the API's. Importing this module never imports torch.

Cross-field validators raise ``ValueError("<sub.path>: <message>")``; `format_errors` joins the
sub-path onto pydantic's location so every message names the full field path
(``spec.method.quantization: ...``).
"""

from __future__ import annotations

import difflib
import re
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

URI_SCHEMES = ("hf", "pvc", "s3", "gs", "gcs", "az", "abfs", "file", "http", "https", "pkg")
_SCHEME_RE = re.compile(r"^([a-z][a-z0-9+.-]*)://")


class SpecModel(BaseModel):
    """Base of every spec model: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )


def check_uri(value: str) -> str:
    """Accept a local path or a URI with a supported scheme; reject anything else."""
    match = _SCHEME_RE.match(value)
    if match and match.group(1) not in URI_SCHEMES:
        raise ValueError(
            f"unsupported URI scheme {match.group(1)!r}; use one of "
            + ", ".join(f"{s}://" for s in URI_SCHEMES)
            + " or a local path"
        )
    if match and len(value) == len(match.group(0)):
        raise ValueError(f"URI {value!r} has a scheme but no location")
    return value


Uri = Annotated[str, Field(min_length=1, max_length=2048), AfterValidator(check_uri)]
Auto = Literal["auto"]


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------
class ModelSpec(SpecModel):
    """The base model to fine-tune."""

    source: Uri = Field(
        description="Where the base model is: hf://org/name, pvc://claim/path, s3://bucket/prefix, "
        "a local directory, a local .gguf file (dequantized on load), or "
        "pkg://python_package/file for a model shipped inside an installed Python package."
    )
    revision: str | None = Field(
        default=None, max_length=256, description="Hub revision (branch, tag or commit) for hf://."
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Run model code shipped with the checkpoint. Off unless the platform allows it.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto",
        description="Weight dtype when loading; auto follows training.precision.",
    )
    attention: Literal["auto", "flash_attention_2", "flex_attention", "sdpa", "eager"] = Field(
        default="auto",
        description="Attention kernel. auto: flash_attention_2 when flash-attn is installed on "
        "CUDA, else flex_attention on CUDA (a document mask: memory linear in tokens for "
        "padding-free and packed batches), else the model's default (sdpa, or eager where "
        "the model has no sdpa). flex_attention trains on CUDA only.",
    )


# --------------------------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------------------------
DatasetFormat = Literal[
    "auto", "alpaca", "chat", "completion", "text", "classification", "preference"
]


class ChatMessage(SpecModel):
    """One message of an inline chat record."""

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=65536)


class InlineRecord(SpecModel):
    """One inline training record; which fields are set depends on the dataset format."""

    instruction: str | None = Field(default=None, max_length=65536)
    input: str | None = Field(default=None, max_length=65536)
    output: str | None = Field(default=None, max_length=65536)
    prompt: str | None = Field(default=None, max_length=65536)
    completion: str | None = Field(default=None, max_length=65536)
    text: str | None = Field(default=None, max_length=65536)
    label: str | None = Field(default=None, max_length=256)
    messages: list[ChatMessage] | None = Field(default=None, max_length=256)
    chosen: str | None = Field(default=None, max_length=65536)
    rejected: str | None = Field(default=None, max_length=65536)


class SplitSpec(SpecModel):
    """A held-out split: its own source, or a fraction of the training data."""

    source: Uri | None = Field(default=None, description="File or URI of this split.")
    split_ratio: float | None = Field(
        default=None,
        gt=0.0,
        le=0.5,
        description="Fraction of the training records held out for this split (seeded).",
    )

    @model_validator(mode="after")
    def _one_of(self) -> SplitSpec:
        if (self.source is None) == (self.split_ratio is None):
            raise ValueError("source: set exactly one of source or splitRatio")
        return self


class MixSpec(SpecModel):
    """More training data mixed in, e.g. general instruction data against forgetting."""

    source: Uri = Field(
        description="File or URI of records in the dataset's format (training only)."
    )
    fraction: float = Field(
        gt=0.0,
        le=10.0,
        description="Records to add, as a fraction of the training examples (sampled, seeded; "
        "at most what the source has).",
    )


class DatasetSpec(SpecModel):
    """Training data: where it is, its format, how it is checked, split and tokenized."""

    source: Uri | None = Field(
        default=None,
        description="JSONL/JSON/CSV/Parquet file or URI (file://, pvc://, s3://, hf://datasets/...).",
    )
    inline: list[InlineRecord] | None = Field(
        default=None, min_length=1, max_length=1000, description="Records given in the spec."
    )
    format: DatasetFormat = Field(
        default="auto", description="Record format; auto detects it from the fields."
    )
    mix: list[MixSpec] | None = Field(
        default=None,
        min_length=1,
        max_length=8,
        description="Other sources mixed into the training split only (never into evaluation).",
    )
    validation: SplitSpec | None = Field(default=None, description="Validation split.")
    test: SplitSpec | None = Field(default=None, description="Test split (evaluated at the end).")
    max_seq_length: int = Field(
        default=1024, ge=16, le=131072, description="Maximum tokens per example."
    )
    template: str | None = Field(
        default=None,
        max_length=16384,
        description="Chat template (Jinja) or 'chatml'; default: the tokenizer's, ChatML fallback.",
    )
    system_prompt: str | None = Field(
        default=None,
        max_length=16384,
        description="System message prepended to chat records that have none.",
    )
    packing: bool = Field(
        default=False,
        description="Pack examples into max-length rows (best-fit decreasing), padding-free.",
    )
    padding_free: bool | Auto = Field(
        default="auto",
        description="Concatenate each batch into one row with position_ids instead of padding "
        "(varlen attention: flash-attention when installed, else SDPA with a block mask); "
        "auto: on for causal-lm except prefix/prompt tuning, batch size 1 and several GPUs "
        "in one process.",
    )
    completion_only_loss: bool | None = Field(
        default=None,
        description="Loss on completion/assistant tokens only. Default: on where the format "
        "has a prompt/completion boundary (not text).",
    )
    duplicates: Literal["drop", "keep"] = Field(
        default="drop", description="What to do with exact duplicate records."
    )
    overlong: Literal["truncate", "drop", "error"] = Field(
        default="truncate", description="What to do with examples longer than maxSeqLength."
    )
    labels: list[Annotated[str, Field(max_length=256)]] | None = Field(
        default=None,
        min_length=2,
        max_length=1000,
        description="Classification label set, in id order; default: sorted labels found.",
    )

    @model_validator(mode="after")
    def _check(self) -> DatasetSpec:
        if (self.source is None) == (self.inline is None):
            raise ValueError("source: set exactly one of source or inline")
        if self.completion_only_loss and self.format == "text":
            raise ValueError(
                "completionOnlyLoss: plain text has no prompt/completion boundary; "
                "set it to false or use alpaca, chat or completion format"
            )
        if self.labels is not None and self.format not in ("auto", "classification"):
            raise ValueError("labels: only used by the classification format")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError("labels: contains duplicates")
        return self


# --------------------------------------------------------------------------------------------
# method
# --------------------------------------------------------------------------------------------
MethodType = Literal["full", "lora", "dora", "qlora", "prefix", "prompt", "ia3"]
LORA_METHODS = ("lora", "dora", "qlora")
PEFT_METHODS = ("lora", "dora", "qlora", "prefix", "prompt", "ia3")
VIRTUAL_TOKEN_METHODS = ("prefix", "prompt")
ALL_LINEAR = "all-linear"


class LoraSpec(SpecModel):
    """LoRA / DoRA / QLoRA adapter shape."""

    r: int = Field(default=16, ge=1, le=1024, description="Adapter rank.")
    alpha: int = Field(default=32, ge=1, le=4096, description="Scaling numerator (alpha / r).")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on adapter input.")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=lambda: [ALL_LINEAR],
        min_length=1,
        max_length=64,
        description="Module names to adapt, or [all-linear] for every linear layer but the head.",
    )
    use_rslora: bool = Field(default=False, description="Rank-stabilised scaling alpha/sqrt(r).")

    @field_validator("target_modules")
    @classmethod
    def _all_linear_alone(cls, value: list[str]) -> list[str]:
        if ALL_LINEAR in value and len(value) > 1:
            raise ValueError(f"{ALL_LINEAR!r} cannot be combined with explicit module names")
        return value


class QuantizationSpec(SpecModel):
    """bitsandbytes k-bit loading of the frozen base model (QLoRA)."""

    bits: Literal[4, 8] = Field(default=4, description="Load the base model in 4 or 8 bits.")
    quant_type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type.")
    double_quant: bool = Field(default=True, description="Quantize the quantization constants.")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Matmul dtype; auto follows training.precision."
    )


class PrefixSpec(SpecModel):
    """Prefix tuning: trainable key/value prefixes on every layer."""

    num_virtual_tokens: int = Field(default=20, ge=1, le=512)


class PromptSpec(SpecModel):
    """Prompt tuning: trainable soft-prompt embeddings."""

    num_virtual_tokens: int = Field(default=20, ge=1, le=512)
    init_text: str | None = Field(
        default=None, max_length=4096, description="Initialise the soft prompt from this text."
    )


class MethodSpec(SpecModel):
    """Which weights are trained and how."""

    type: MethodType = Field(default="lora", description="Fine-tuning method.")
    lora: LoraSpec | None = Field(default=None, description="Adapter shape for lora/dora/qlora.")
    quantization: QuantizationSpec | None = Field(
        default=None, description="k-bit loading of the base; qlora defaults to 4-bit nf4."
    )
    prefix: PrefixSpec | None = Field(default=None, description="Settings for prefix tuning.")
    prompt: PromptSpec | None = Field(default=None, description="Settings for prompt tuning.")

    @model_validator(mode="after")
    def _check(self) -> MethodSpec:
        if self.lora is not None and self.type not in LORA_METHODS:
            raise ValueError(f"lora: only used by lora, dora and qlora, not {self.type}")
        if self.prefix is not None and self.type != "prefix":
            raise ValueError(f"prefix: only used by method type prefix, not {self.type}")
        if self.prompt is not None and self.type != "prompt":
            raise ValueError(f"prompt: only used by method type prompt, not {self.type}")
        if self.quantization is not None and self.type == "full":
            raise ValueError(
                "quantization: a full fine-tune cannot train k-bit weights; "
                "use type qlora (or lora with quantization)"
            )
        if self.type == "qlora" and self.quantization is None:
            self.quantization = QuantizationSpec()
        if self.type in LORA_METHODS and self.lora is None:
            self.lora = LoraSpec()
        if self.type == "prefix" and self.prefix is None:
            self.prefix = PrefixSpec()
        if self.type == "prompt" and self.prompt is None:
            self.prompt = PromptSpec()
        return self


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
class EarlyStoppingSpec(SpecModel):
    """Stop when the eval metric has not improved for `patience` evaluations."""

    patience: int = Field(default=3, ge=1, le=100)
    metric: Literal["eval_loss", "eval_accuracy"] = Field(default="eval_loss")
    threshold: float = Field(default=0.0, ge=0.0, le=1.0, description="Minimum improvement.")


class FsdpSpec(SpecModel):
    """FSDP2 settings: how training state is sharded over the workers."""

    cpu_offload: bool = Field(
        default=False,
        description="Keep sharded parameters, gradients and optimizer state in CPU memory "
        "between uses (slower; fits models whose shards exceed GPU memory).",
    )
    sharding: Literal["global", "node"] = Field(
        default="global",
        description="global: shard over every worker of the run; node: shard within each pod "
        "and replicate across pods (hybrid sharding: less traffic between nodes).",
    )


class DistributedSpec(SpecModel):
    """How the workers of a run (resources.nodes x resources.gpus) share the training."""

    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        default="auto",
        description="ddp: every worker holds the whole model, batches are split; fsdp: "
        "parameters, gradients and optimizer state are sharded (FSDP2); auto: ddp when the "
        "model and its training state fit one GPU, else fsdp (see docs/distributed.md).",
    )
    fsdp: FsdpSpec | None = Field(default=None, description="FSDP settings.")
    timeout_seconds: int = Field(
        default=600,
        ge=30,
        le=7200,
        description="How long a collective waits for a worker that went away before the "
        "others give up (the group then restarts from the last complete checkpoint).",
    )

    @model_validator(mode="after")
    def _check(self) -> DistributedSpec:
        if self.fsdp is not None and self.strategy == "ddp":
            raise ValueError("fsdp: only used by strategy fsdp (or auto)")
        return self


Objective = Literal["sft", "dpo", "orpo"]
PREFERENCE_OBJECTIVES = ("dpo", "orpo")
DpoLoss = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "bco_pair",
    "sppo_hard",
    "nca_pair",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "sigmoid_norm",
]


class DpoSpec(SpecModel):
    """Direct Preference Optimization (TRL's DPOTrainer)."""

    beta: float = Field(
        default=0.1,
        gt=0.0,
        le=10.0,
        description="How far the model may move from the reference (higher: closer); for "
        "ipo the regularization strength tau.",
    )
    loss_type: DpoLoss = Field(
        default="sigmoid",
        description="DPO loss variant as TRL names it: sigmoid (the DPO paper), hinge (SLiC), "
        "ipo, robust, bco_pair, sppo_hard, nca_pair, aot, aot_unpaired, apo_zero, apo_down, "
        "sigmoid_norm (length-normalized).",
    )
    label_smoothing: float = Field(
        default=0.0,
        ge=0.0,
        lt=0.5,
        description="robust loss only: the assumed probability that a pair's preference is "
        "flipped (noisy labels).",
    )

    @model_validator(mode="after")
    def _check(self) -> DpoSpec:
        if self.label_smoothing and self.loss_type != "robust":
            raise ValueError("labelSmoothing: only used by lossType robust")
        return self


class OrpoSpec(SpecModel):
    """Odds Ratio Preference Optimization (TRL's ORPOTrainer): no reference model."""

    lambda_: float = Field(
        default=0.1,
        alias="lambda",
        gt=0.0,
        le=10.0,
        description="Weight of the odds-ratio (preference) term added to the chosen answers' "
        "language-modelling loss (the paper's lambda).",
    )


class TrainingSpec(SpecModel):
    """Optimisation hyperparameters. `auto` values follow the rules in docs/training.md."""

    objective: Objective = Field(
        default="sft",
        description="What the run optimizes: sft (supervised: learn the completions), dpo or "
        "orpo (preference tuning on chosen/rejected pairs; needs preference data).",
    )
    dpo: DpoSpec | None = Field(default=None, description="DPO settings (objective dpo).")
    orpo: OrpoSpec | None = Field(default=None, description="ORPO settings (objective orpo).")

    epochs: Annotated[int, Field(ge=1, le=1000)] | Auto = Field(
        default="auto", description="Passes over the data, or auto (from dataset size)."
    )
    max_steps: int | None = Field(
        default=None, ge=1, le=10_000_000, description="Stop after this many optimizer steps."
    )
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] | Auto = Field(
        default="auto", description="Peak learning rate, or auto (from the method)."
    )
    batch_size: Annotated[int, Field(ge=1, le=4096)] | Auto = Field(
        default="auto", description="Per-device batch size, or auto (largest that fits)."
    )
    batch_tokens: Annotated[int, Field(ge=64, le=4_194_304)] | Auto | None = Field(
        default="auto",
        description="Size each device batch by tokens instead of rows: examples are grouped "
        "so a batch holds at most this many tokens (a longer example goes alone); for "
        "padding-free or packed causal-LM batches, instead of batchSize. auto: on GPU with a "
        "variable-length attention kernel and batchSize auto, a budget from the memory "
        "estimate (docs/training.md); otherwise rows of batchSize.",
    )
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=1024)
    warmup_ratio: float = Field(default=0.03, ge=0.0, le=0.5)
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0, le=100.0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto", description="auto: bf16 where supported, else fp16 on GPU, fp32 on CPU."
    )
    gradient_checkpointing: bool | Auto = Field(
        default="auto", description="Recompute activations; auto turns it on for large models."
    )
    liger_kernel: bool | Auto = Field(
        default="auto",
        description="Liger Triton kernels (RMSNorm, RoPE, SwiGLU; CUDA only); auto: on with "
        "CUDA when liger-kernel is installed (the trainer image has it).",
    )
    seed: int = Field(default=42, ge=0, le=2**31 - 1)
    logging_steps: int = Field(default=10, ge=1, le=100_000)
    eval_steps: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description="Evaluate every N steps (default: per epoch).",
    )
    save_steps: int = Field(
        default=100, ge=1, le=10_000_000, description="Checkpoint every N steps."
    )
    save_total_limit: int = Field(
        default=3, ge=1, le=100, description="Checkpoints kept, plus the best one."
    )
    early_stopping: EarlyStoppingSpec | None = None
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec,
        description="Several workers (GPUs, pods): DDP or FSDP; used when the run has more "
        "than one worker.",
    )

    @model_validator(mode="after")
    def _objective_settings(self) -> TrainingSpec:
        if self.dpo is not None and self.objective != "dpo":
            raise ValueError(f"dpo: only used by objective dpo, not {self.objective}")
        if self.orpo is not None and self.objective != "orpo":
            raise ValueError(f"orpo: only used by objective orpo, not {self.objective}")
        if self.objective == "dpo" and self.dpo is None:
            self.dpo = DpoSpec()
        if self.objective == "orpo" and self.orpo is None:
            self.orpo = OrpoSpec()
        return self

    @model_validator(mode="after")
    def _batch_by_rows_or_tokens(self) -> TrainingSpec:
        if isinstance(self.batch_tokens, int) and isinstance(self.batch_size, int):
            raise ValueError(
                "batchTokens: set batchSize or batchTokens, not both (a token budget sizes "
                "the batch; leave batchSize auto)"
            )
        return self

    @model_validator(mode="after")
    def _save_at_evaluations(self) -> TrainingSpec:
        es, every = self.early_stopping, self.eval_steps
        if es is not None and every is not None and self.save_steps % every:
            raise ValueError(
                f"saveSteps: must be a multiple of evalSteps ({every}) when earlyStopping is "
                "set: the best checkpoint is chosen at evaluations"
            )
        return self


# --------------------------------------------------------------------------------------------
# evaluation beyond the loss
# --------------------------------------------------------------------------------------------
class GenerationEvalSpec(SpecModel):
    """Answer held-out prompts with the untuned and the tuned model and score the answers."""

    examples: int = Field(
        default=32,
        ge=1,
        le=1000,
        description="Held-out examples to answer: from the validation split, else the test split.",
    )
    max_new_tokens: int = Field(
        default=128, ge=1, le=4096, description="Tokens generated per answer (greedy)."
    )


class EvaluationSpec(SpecModel):
    """Evaluation beyond the validation loss."""

    generation: GenerationEvalSpec | None = Field(
        default=None,
        description="Score generated answers against the reference completions (ROUGE-L, "
        "BLEU), before and after training; writes samples.jsonl.",
    )


# --------------------------------------------------------------------------------------------
# output and the whole run
# --------------------------------------------------------------------------------------------
class OutputSpec(SpecModel):
    """Where the run writes checkpoints, the adapter, metrics and the model card."""

    uri: Uri = Field(
        description="Output location: a local path, pvc://claim/path, s3://bucket/prefix or "
        "hf://org/repo (pushed at the end)."
    )
    merge_adapter: bool = Field(
        default=False, description="Also write merged/ (base + adapter), e.g. for vLLM."
    )


# --------------------------------------------------------------------------------------------
# experiment trackers
# --------------------------------------------------------------------------------------------
#: An MLflow tracking server: http(s)://host[:port][/path], or a Databricks workspace.
MLFLOW_URI_PATTERN = (
    r"^(https?://([A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?"
    r"(/[^\s]*)?|databricks(://[A-Za-z0-9_.-]+)?)$"
)
_MLFLOW_URI_RE = re.compile(MLFLOW_URI_PATTERN)
TrackerName = Literal["mlflow", "wandb", "tensorboard"]


def check_mlflow_uri(value: str) -> str:
    """Accept an MLflow tracking server URI (the trainer reports over HTTP, not to files)."""
    if "@" in value.split("/", 3)[2 if "://" in value else 0]:  # never echoed: it may be a secret
        raise ValueError(
            "credentials do not belong in the URI: put MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in a Secret named by "
            "spec.secrets.mlflow"
        )
    if not _MLFLOW_URI_RE.match(value):
        raise ValueError(
            f"{value!r} is not an MLflow tracking server: use http(s)://host[:port][/path] "
            "(e.g. http://mlflow.mlflow.svc:5000) or databricks"
        )
    return value


class MlflowSpec(SpecModel):
    """Report to an MLflow tracking server (credentials from spec.secrets.mlflow)."""

    tracking_uri: Annotated[
        str,
        Field(max_length=2048, json_schema_extra={"pattern": MLFLOW_URI_PATTERN}),
        AfterValidator(check_mlflow_uri),
    ] = Field(description="The tracking server, e.g. http://mlflow.mlflow.svc:5000.")
    experiment: str = Field(
        min_length=1, max_length=500, description="Experiment name (created if missing)."
    )
    tags: dict[str, Annotated[str, Field(max_length=5000)]] | None = Field(
        default=None, max_length=32, description="More tags on the run."
    )

    @field_validator("tags")
    @classmethod
    def _tag_keys(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key in value or {}:
            if not 0 < len(key) <= 250:
                raise ValueError(f"tag name {key[:40]!r}...: 1 to 250 characters")
        return value


class WandbSpec(SpecModel):
    """Report to Weights & Biases (API key from spec.secrets.wandb)."""

    project: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[^/\\#?%:]+$",
        description="Project name (no / \\ # ? % :).",
    )
    entity: str | None = Field(
        default=None, min_length=1, max_length=128, description="Team or user; default: the key's."
    )
    group: str | None = Field(
        default=None, min_length=1, max_length=128, description="Group runs together."
    )
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        default=None, max_length=32, description="Tags on the run."
    )
    mode: Literal["online", "offline"] = Field(
        default="online",
        description="offline: write the run under <output>/wandb/ only (upload later with "
        "`wandb sync`); needs no API key.",
    )


class TrackingSpec(SpecModel):
    """Experiment trackers the run reports to (several at once are allowed)."""

    run_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=250,
        description="The run's name in every tracker; default: the FineTuneJob's name.",
    )
    mlflow: MlflowSpec | None = Field(default=None, description="MLflow tracking server.")
    wandb: WandbSpec | None = Field(default=None, description="Weights & Biases.")
    tensorboard: bool = Field(
        default=False,
        description="Write TensorBoard event files under <output>/tensorboard/.",
    )

    @model_validator(mode="after")
    def _some(self) -> TrackingSpec:
        if self.mlflow is None and self.wandb is None and not self.tensorboard:
            raise ValueError("set at least one of mlflow, wandb or tensorboard: true")
        return self

    def enabled(self) -> list[TrackerName]:
        """The trackers this run reports to."""
        names: list[TrackerName] = []
        if self.mlflow is not None:
            names.append("mlflow")
        if self.wandb is not None:
            names.append("wandb")
        if self.tensorboard:
            names.append("tensorboard")
        return names


TaskType = Literal["causal-lm", "sequence-classification"]


class RunConfig(SpecModel):
    """One fine-tuning run: the part of a FineTuneJob spec the trainer needs."""

    model: ModelSpec
    dataset: DatasetSpec
    task: TaskType = Field(default="causal-lm", description="Training objective.")
    method: MethodSpec = Field(default_factory=MethodSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec | None = None
    output: OutputSpec
    tracking: TrackingSpec | None = Field(
        default=None, description="Experiment trackers: MLflow, Weights & Biases, TensorBoard."
    )

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        fmt = self.dataset.format
        if self.task == "sequence-classification":
            if fmt not in ("auto", "classification"):
                raise ValueError(
                    f"dataset.format: sequence-classification needs classification data "
                    f"(text/label), not {fmt}"
                )
            if self.dataset.packing:
                raise ValueError("dataset.packing: not used by sequence-classification")
            if self.dataset.padding_free is True:
                raise ValueError("dataset.paddingFree: not used by sequence-classification")
        elif fmt == "classification":
            raise ValueError(
                "dataset.format: classification data needs task sequence-classification"
            )
        if self.dataset.mix is not None and self.task != "causal-lm":
            raise ValueError("dataset.mix: only for task causal-lm")
        self._check_batch_tokens()
        if self.dataset.padding_free is True and self.method.type in ("prefix", "prompt"):
            raise ValueError(
                f"dataset.paddingFree: {self.method.type} tuning prepends virtual tokens to "
                "each row; set it to auto or false"
            )
        if self.output.merge_adapter and self.method.type in ("full", "prefix", "prompt"):
            raise ValueError(
                f"output.mergeAdapter: a {self.method.type} run has no adapter weights to merge"
            )
        needs_eval = self.training.early_stopping is not None or self.training.eval_steps
        if needs_eval and self.dataset.validation is None:
            field = "earlyStopping" if self.training.early_stopping else "evalSteps"
            raise ValueError(f"training.{field}: needs a validation split (set dataset.validation)")
        if self.evaluation is not None and self.evaluation.generation is not None:
            self._check_generation_eval()
        es = self.training.early_stopping
        if es and es.metric == "eval_accuracy" and self.task != "sequence-classification":
            raise ValueError(
                "training.earlyStopping.metric: eval_accuracy is only computed for "
                "sequence-classification"
            )
        self._check_virtual_tokens()
        self._check_fsdp()
        self._check_preference()
        return self

    @property
    def preference(self) -> bool:
        """Whether the run tunes on chosen/rejected pairs (objective dpo or orpo)."""
        return self.training.objective in PREFERENCE_OBJECTIVES

    def _check_preference(self) -> None:
        """Preference objectives and preference data go together (causal LM only)."""
        objective, fmt = self.training.objective, self.dataset.format
        if fmt == "preference" and not self.preference:
            raise ValueError(
                "training.objective: preference data (prompt/chosen/rejected) needs objective "
                "dpo or orpo"
            )
        if not self.preference:
            return
        if self.task != "causal-lm":
            raise ValueError(f"training.objective: {objective} trains causal-lm only")
        if fmt not in ("auto", "preference"):
            raise ValueError(
                f"dataset.format: objective {objective} needs preference data "
                f"(prompt/chosen/rejected), not {fmt}"
            )
        if self.dataset.packing:
            raise ValueError(f"dataset.packing: not used by objective {objective}")
        if self.dataset.padding_free is True:
            raise ValueError(f"dataset.paddingFree: not used by objective {objective}")
        if self.method.type in VIRTUAL_TOKEN_METHODS:
            raise ValueError(
                f"method.type: {self.method.type} tuning is not supported with objective "
                f"{objective}; use lora, dora, qlora, ia3 or full"
            )
        if isinstance(self.training.batch_tokens, int):
            raise ValueError(
                f"training.batchTokens: not used by objective {objective} (its batches are "
                "pairs); use batchSize"
            )
        if self.training.distributed.strategy == "fsdp":
            raise ValueError(
                f"training.distributed.strategy: objective {objective} is not sharded by FSDP "
                "here; use ddp"
            )

    def _check_batch_tokens(self) -> None:
        """A token budget groups examples into padding-free (or packed) causal-LM batches."""
        if not isinstance(self.training.batch_tokens, int):
            return
        if self.task != "causal-lm":
            raise ValueError(
                "training.batchTokens: only for task causal-lm; use batchSize for "
                "sequence-classification"
            )
        if self.method.type in VIRTUAL_TOKEN_METHODS:
            raise ValueError(
                f"training.batchTokens: {self.method.type} tuning trains padded rows (its "
                "virtual tokens are per row); use batchSize"
            )
        if self.dataset.padding_free is False and not self.dataset.packing:
            raise ValueError(
                "training.batchTokens: needs padding-free batches (a budget of padded rows "
                "would count padding); set dataset.paddingFree to auto or true, or use batchSize"
            )

    def _check_fsdp(self) -> None:
        """What FSDP cannot shard."""
        if self.training.distributed.strategy != "fsdp":
            return
        if self.method.type in VIRTUAL_TOKEN_METHODS:
            raise ValueError(
                f"training.distributed.strategy: {self.method.type} tuning is not sharded by "
                "FSDP; use ddp (its trainable state is tiny)"
            )
        q = self.method.quantization
        if q is not None and q.bits == 8:
            raise ValueError(
                "training.distributed.strategy: FSDP cannot shard an 8-bit base; use 4-bit "
                "quantization (qlora) or ddp"
            )
        if self.output.merge_adapter:
            raise ValueError(
                "output.mergeAdapter: an FSDP run's model is sharded and cannot be merged in "
                "the trainer; merge the adapter afterwards, or use ddp"
            )
        if self.evaluation is not None and self.evaluation.generation is not None:
            raise ValueError(
                "evaluation.generation: an FSDP run's model is sharded and cannot generate in "
                "the trainer; use ddp, or evaluate the saved model afterwards"
            )

    def _check_virtual_tokens(self) -> None:
        """What prefix and prompt tuning cannot do (each found by running it on tiny models)."""
        kind = self.method.type
        if kind not in VIRTUAL_TOKEN_METHODS:
            return
        if self.task != "causal-lm":
            raise ValueError(
                f"method.type: {kind} tuning trains causal-lm only (PEFT cannot run it in front "
                "of a classification head); use lora, dora, ia3 or full for "
                "sequence-classification"
            )
        if self.training.precision in ("bf16", "fp16"):
            raise ValueError(
                f"training.precision: {kind} tuning runs in fp32 (mixed precision breaks the "
                "trainer's fused LM head for virtual tokens); set it to fp32 or auto"
            )
        if kind == "prefix" and self.training.gradient_checkpointing is True:
            raise ValueError(
                "training.gradientCheckpointing: prefix tuning cannot recompute activations "
                "(its key/value cache is not checkpointable in PEFT); set it to false or auto"
            )

    def _check_generation_eval(self) -> None:
        if self.task != "causal-lm":
            raise ValueError("evaluation.generation: only for task causal-lm")
        if self.dataset.format == "text":
            raise ValueError(
                "evaluation.generation: needs prompt/completion data (alpaca, chat or "
                "completion); text has no prompt to answer"
            )
        if self.dataset.validation is None and self.dataset.test is None:
            raise ValueError(
                "evaluation.generation: needs held-out prompts (set dataset.validation or "
                "dataset.test)"
            )


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


_SUBPATH_RE = re.compile(r"^(?:Value error, )?([A-Za-z][\w.\[\]]*): (.*)$", re.S)


_UNION_TAGS = ("bool", "int", "float", "str")


def _is_union_tag(part: int | str) -> bool:
    """Whether a location part names a union member (`constrained-float`), not a field."""
    text = str(part)
    return text in _UNION_TAGS or text.startswith(("function-", "literal[", "constrained-"))


def _strip(annotation: Any) -> Any:
    """The type under Annotated[...] and `X | None`; None where a union has several members."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return None
            annotation = members[0]
        else:
            return annotation


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The spec model that the field path `loc` (aliases, list indexes) leads to, if any."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            args = get_args(current) if get_origin(current) is list else ()
            current = _strip(args[0]) if args else None
        elif isinstance(current, type) and issubclass(current, BaseModel):
            field = next((f for n, f in current.model_fields.items() if part in (n, f.alias)), None)
            current = _strip(field.annotation) if field else None
        else:
            return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unknown_field_message(model: type[BaseModel] | None, loc: tuple[int | str, ...]) -> str:
    """'unknown field', with the closest real field of the same object when one is close."""
    parent = _model_at(model, loc[:-1]) if model is not None and loc else None
    if parent is None:
        return "unknown field"
    names = {(f.alias or n).lower(): f.alias or n for n, f in parent.model_fields.items()}
    close = difflib.get_close_matches(str(loc[-1]).lower(), list(names), n=1, cutoff=0.75)
    return f"unknown field; did you mean {names[close[0]]}?" if close else "unknown field"


def format_errors(
    exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None
) -> list[str]:
    """Render a ValidationError as ``field.path: message`` lines (camelCase, with `prefix`).
    With the validated `model`, an unknown field names the closest real one (a typo's fix)."""
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not _is_union_tag(p))
        path = _loc_to_path(((prefix,) if prefix else ()) + loc)
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = _unknown_field_message(model, loc)
        match = _SUBPATH_RE.match(message) if err["type"] == "value_error" else None
        if match:
            path = f"{path}.{match.group(1)}" if path else match.group(1)
            message = match.group(2)
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        lines.append(f"{path}: {message}" if path else message)
    return lines


class ConfigError(ValueError):
    """An invalid run config or manifest; `errors` holds one ``path: message`` line each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def parse_run_config(data: dict[str, Any], prefix: str = "") -> RunConfig:
    """Validate `data` as a RunConfig, raising ConfigError with field-path messages."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, prefix, RunConfig)) from None


#: Kubernetes object names (metadata.name): a DNS-1123 subdomain of at most 253 characters.
OBJECT_NAME_MAX = 253
OBJECT_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def object_name_error(name: object) -> str | None:
    """Why `name` is not a valid metadata.name, as the API server checks it; None if valid."""
    if name is None or name == "":
        return "required: a lowercase DNS name such as my-run-1"
    if not isinstance(name, str):
        return "must be a string: a lowercase DNS name such as my-run-1"
    if len(name) > OBJECT_NAME_MAX:
        return f"{len(name)} characters; at most {OBJECT_NAME_MAX}"
    if not OBJECT_NAME_RE.fullmatch(name):
        return (
            "must be a lowercase DNS name: a-z, 0-9, '-' and '.', starting and ending with a "
            "letter or digit (e.g. my-run-1)"
        )
    return None


def run_field_names() -> set[str]:
    """The camelCase keys of a RunConfig (to tell run fields from placement fields)."""
    return {f.alias or name for name, f in RunConfig.model_fields.items()}
