"""A run against a target (GPUs and their memory): the batch size and gradient checkpointing
`auto` resolves to, the per-GPU memory estimate, time and cost, and advice on what fits.

Shared by `finetune plan` and the trainer (`runner.execute`), which estimates before loading
any weights and reports the result as `status.estimate`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from finetune_trainer import hyper
from finetune_trainer.config import MethodSpec, RunConfig
from finetune_trainer.planning.flops import training_flops
from finetune_trainer.planning.gpus import GIB, MFU_RANGE, GpuType
from finetune_trainer.planning.memory import Layout, MemoryEstimate, Setup, estimate
from finetune_trainer.planning.shape import ModelShape, ParamCounts
from finetune_trainer.progress import Estimate
from finetune_trainer.strategy import Strategy, choose

# `batchSize: auto` turns gradient checkpointing on (when `auto`) only if no batch of at least
# this many examples fits without it: a smaller batch wastes the GPU more than recomputation.
USEFUL_BATCH = 8
# GPU counts the advice tries, per method
WORLD_SIZES = (1, 2, 4, 8, 16, 32, 64)
# the order methods are advised in
METHOD_ORDER = ("full", "lora", "dora", "qlora", "ia3", "prefix", "prompt")
# the guides' data advice
FEW_EXAMPLES = 100
FEW_FOR_FULL = 1000


@dataclass(frozen=True)
class Target:
    """Where the run trains: `gpus` per pod (0: CPU) on `nodes` pods, each GPU of `memory`
    bytes (None: unknown), optionally of a known type and price."""

    gpus: int = 1
    nodes: int = 1
    memory: int | None = None
    gpu: GpuType | None = None
    price_per_gpu_hour: float | None = None

    @property
    def cuda(self) -> bool:
        """Training on GPUs."""
        return self.gpus > 0

    @property
    def world_size(self) -> int:
        """Worker processes: one per GPU (one per pod on CPU)."""
        return max(self.gpus, 1) * self.nodes


@dataclass(frozen=True)
class Data:
    """The training split as the validator counted it (token lengths per example)."""

    lengths: tuple[int, ...]

    @property
    def examples(self) -> int:
        """Training examples."""
        return len(self.lengths)

    @property
    def tokens(self) -> int:
        """Training tokens per epoch."""
        return sum(self.lengths)


@dataclass(frozen=True)
class ModelFacts:
    """The model's shape and the exact parameter counts of the run's method on it."""

    shape: ModelShape
    params: ParamCounts


def layout(run: RunConfig, batch_size: int) -> Layout:
    """How the trainer lays out a micro-batch (as `runner.padding_free` decides it)."""
    from finetune_trainer.runner import padding_free

    if run.task == "causal-lm" and run.dataset.packing:
        return "packed"
    if padding_free(run, batch_size=batch_size):
        return "padding-free"
    return "padded"


def precision(run: RunConfig, target: Target) -> str:
    """The training precision `auto` resolves to (bf16 on GPUs that have it)."""
    if run.method.type in ("prefix", "prompt"):
        return "fp32"
    if run.training.precision != "auto":
        return run.training.precision
    if not target.cuda:
        return "fp32"
    return "fp16" if target.gpu is not None and target.gpu.name == "T4" else "bf16"


def weight_bytes(run: RunConfig, prec: str) -> int:
    """Bytes per base parameter as loaded (as `runner` picks the load dtype)."""
    if run.model.dtype != "auto":
        return 4 if run.model.dtype == "float32" else 2
    if prec == "bf16" or (prec == "fp16" and run.method.type != "full"):
        return 2
    return 4


def setup_for(
    run: RunConfig,
    target: Target,
    batch_size: int,
    checkpointing: bool,
    strategy: Strategy,
    data: Data | None,
) -> Setup:
    """The memory-relevant settings of `run` at a batch size and checkpointing choice."""
    prec = precision(run, target)
    q = run.method.quantization
    return Setup(
        method=run.method.type,
        compute_bytes=4 if prec == "fp32" else 2,
        weight_bytes=weight_bytes(run, prec),
        batch_size=batch_size,
        max_seq_length=run.dataset.max_seq_length,
        layout=layout(run, batch_size),
        gradient_checkpointing=checkpointing,
        quant_bits=q.bits if q is not None else None,
        double_quant=q.double_quant if q is not None else True,
        liger=run.training.liger_kernel is True,
        flash_attention=run.model.attention == "flash_attention_2",
        world_size=strategy.world_size,
        fsdp=strategy.fsdp,
        causal_lm=run.task == "causal-lm",
        lengths=data.lengths if data is not None else None,
        pairs=run.preference,
        reference_copy=run.training.objective == "dpo" and run.method.type == "full",
    )


@dataclass(frozen=True)
class Resolved:
    """What `auto` resolves to against the target, and the memory estimate of it."""

    batch_size: int
    gradient_checkpointing: bool
    strategy: Strategy
    memory: MemoryEstimate
    fits: bool | None  # None: the GPU's memory is unknown


def _batches(run: RunConfig, target: Target, data: Data | None) -> list[int]:
    """Batch sizes to consider, largest first."""
    t = run.training
    if t.batch_size != "auto":
        return [int(t.batch_size)]
    n = data.examples if data is not None else hyper.GPU_AUTO_BATCH_START
    if not target.cuda or target.memory is None:
        return [min(hyper.CPU_AUTO_BATCH, max(n, 1))]
    start = min(hyper.GPU_AUTO_BATCH_START, max(n, 1))
    return [b for b in (2**i for i in range(start.bit_length(), -1, -1)) if b <= start]


def _checkpointing(run: RunConfig, target: Target) -> list[bool]:
    """Checkpointing choices to consider, in order of preference."""
    chosen = run.training.gradient_checkpointing
    if chosen != "auto":
        return [bool(chosen)]
    # never on CPU (recomputation only costs time there); on GPU only when it is needed
    return [False, True] if target.cuda and target.memory is not None else [False]


def resolve(
    run: RunConfig,
    facts: ModelFacts,
    target: Target,
    data: Data | None,
    strategy: Strategy | None = None,
) -> Resolved:
    """Batch size and gradient checkpointing for the target, from the estimate: `auto`
    checkpointing turns on exactly when the estimate without it does not fit (for
    `batchSize: auto`, when no batch of USEFUL_BATCH fits without it); `auto` batch is the
    largest power of two (up to the probe's start) that fits."""
    chosen = strategy or choose(run, target.world_size, facts.params.total, target.memory)
    batches = _batches(run, target, data)
    tried: list[Resolved] = []
    for checkpointing in _checkpointing(run, target):
        for batch in batches:
            setup = setup_for(run, target, batch, checkpointing, chosen, data)
            est = estimate(facts.shape, facts.params, setup)
            fits = None if target.memory is None else est.fits(target.memory)
            tried.append(Resolved(batch, checkpointing, chosen, est, fits))
            if fits is not False:
                break  # the largest batch that fits with this checkpointing
        got = tried[-1]
        useful = run.training.batch_size != "auto" or got.batch_size >= min(
            USEFUL_BATCH, batches[0]
        )
        if got.fits is not False and useful:
            return got
    fitting = [r for r in tried if r.fits]
    # the largest batch that fits at all; nothing fits: the smallest setting tried
    return max(fitting, key=lambda r: r.batch_size) if fitting else tried[-1]


@dataclass(frozen=True)
class Timing:
    """Steps, trained tokens and the expected duration (a range), GPU-hours and cost."""

    steps: int | None
    epochs: float | None
    trained_tokens: int | None
    seconds: tuple[float, float] | None = None
    gpu_hours: tuple[float, float] | None = None
    cost: tuple[float, float] | None = None


def timing(
    run: RunConfig, facts: ModelFacts, target: Target, data: Data | None, batch_size: int
) -> Timing:
    """Steps and the duration range: model FLOPs over the trainer's measured MFU range on the
    target GPU type (unknown type or CPU: steps and tokens only)."""
    t = run.training
    if data is None or not data.examples:
        return Timing(t.max_steps, None, None)
    per_step = batch_size * target.world_size
    batches = math.ceil(data.examples / per_step)
    per_epoch = max(math.ceil(batches / t.gradient_accumulation_steps), 1)
    epochs = float(hyper.auto_epochs(data.examples) if t.epochs == "auto" else t.epochs)
    if t.max_steps:
        steps, epochs = t.max_steps, t.max_steps / per_epoch
    else:
        steps = math.ceil(per_epoch * epochs)
    tokens = round(data.tokens * epochs)
    if target.gpu is None or not target.cuda:
        return Timing(steps, epochs, tokens)
    adapter = 0 if run.method.type == "full" else facts.params.trainable
    flops = training_flops(facts.shape, data.lengths, run.method.type, adapter) * epochs
    rate = target.world_size * target.gpu.peak_flops
    low, high = flops / (rate * MFU_RANGE[1]), flops / (rate * MFU_RANGE[0])
    hours = (low * target.world_size / 3600, high * target.world_size / 3600)
    price = target.price_per_gpu_hour
    cost = (hours[0] * price, hours[1] * price) if price is not None else None
    return Timing(steps, epochs, tokens, (low, high), hours, cost)


@dataclass(frozen=True)
class Option:
    """One configuration that fits: a method on `gpus` GPUs of the target's memory."""

    method: str
    gpus: int
    strategy: str
    gradient_checkpointing: bool
    batch_size: int
    peak_bytes: int
    seconds: tuple[float, float] | None
    cuda: bool = True

    def describe(self) -> str:
        """`lora: 1 GPU (batch 8, 23.1 GiB per GPU)`."""
        how = f", {self.strategy.upper()}" if self.gpus > 1 else ""
        ckpt = ", checkpointing" if self.gradient_checkpointing else ""
        unit = "GPU" if self.cuda else "worker"
        gpus = f"{self.gpus} {unit}{'s' if self.gpus > 1 else ''}"
        return (
            f"{self.method}: {gpus}{how}{ckpt} (batch {self.batch_size}, "
            f"{self.peak_bytes / GIB:.1f} GiB per {unit})"
        )


@dataclass(frozen=True)
class Advice:
    """Per method the fewest GPUs that fit, the smallest and fastest of them, data advice."""

    options: list[Option] = field(default_factory=list)
    smallest: Option | None = None
    fastest: Option | None = None
    notes: list[str] = field(default_factory=list)


def variant(run: RunConfig, method: str, batch_size: int | None = None) -> RunConfig:
    """`run` with another method (its LoRA shape kept for lora/qlora), `auto` checkpointing
    and, when given, a fixed batch size."""
    lora = run.method.lora.model_dump() if run.method.lora is not None else None
    spec = MethodSpec.model_validate(
        {"type": method, **({"lora": lora} if lora and method != "full" else {})}
    )
    update: dict[str, Any] = {"gradient_checkpointing": "auto"}
    if batch_size is not None:
        update["batch_size"] = batch_size
    return run.model_copy(
        update={"method": spec, "training": run.training.model_copy(update=update)}
    )


def option_for(
    run: RunConfig, facts: ModelFacts, target: Target, data: Data | None
) -> Option | None:
    """The fewest GPUs (of the target's kind) on which `run` fits, or None."""
    for world in WORLD_SIZES:
        placed = replace(target, gpus=world, nodes=1)
        tries = [choose(run, world, facts.params.total, target.memory)]
        if world > 1 and not tries[0].fsdp:
            tries.append(Strategy("fsdp", world, "advice"))
        for strategy in tries:
            got = resolve(run, facts, placed, data, strategy)
            if got.fits:
                seconds = timing(run, facts, placed, data, got.batch_size).seconds
                return Option(
                    run.method.type,
                    world,
                    strategy.kind,
                    got.gradient_checkpointing,
                    got.batch_size,
                    got.memory.total,
                    seconds,
                    target.cuda,
                )
    return None


def _fewest(
    run: RunConfig, method: str, facts: ModelFacts, target: Target, data: Data | None, batch: int
) -> Option | None:
    """The fewest GPUs for `method` at `batch`, else at the largest smaller batch that fits
    (raise gradientAccumulationSteps to keep the global batch)."""
    while batch >= 1:
        found = option_for(variant(run, method, batch), facts, target, data)
        if found is not None:
            return found
        batch //= 2
    return None


def data_notes(run: RunConfig, data: Data | None) -> list[str]:
    """The guides' advice on data volume."""
    if data is None:
        return []
    n = data.examples
    notes = []
    if n < FEW_EXAMPLES:
        notes.append(
            f"only {n} training examples: fine-tuning will mostly learn format and style; "
            "hundreds to thousands of examples are needed to teach a task (or try prompting "
            "with a few examples first)"
        )
    if run.method.type == "full" and n < FEW_FOR_FULL:
        notes.append(
            f"{n} examples are few for a full fine-tune: an adapter (method lora) learns as "
            "much from them with far less memory and less forgetting"
        )
    return notes


def advise(
    run: RunConfig,
    counts: dict[str, ModelFacts],
    target: Target,
    data: Data | None,
) -> Advice:
    """Per method (`counts`: facts of each method's variant) the fewest GPUs that fit, and
    the smallest (fewest GPUs, then least memory) and fastest (shortest expected time) of
    them. The user's spec is never changed: this is advice."""
    if target.memory is None:
        return Advice(notes=data_notes(run, data))
    batch = run.training.batch_size
    if batch == "auto":  # compare the methods at one useful batch
        batch = min(USEFUL_BATCH, data.examples) if data is not None else USEFUL_BATCH
    methods = sorted(counts, key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else 99)
    options = [
        found
        for method in methods
        if target.cuda or method != "qlora"  # k-bit bases need a CUDA GPU
        if (found := _fewest(run, method, counts[method], target, data, int(batch))) is not None
    ]
    smallest = min(options, key=lambda o: (o.gpus, o.peak_bytes), default=None)
    timed = [o for o in options if o.seconds is not None]
    fastest = min(timed, key=lambda o: o.seconds[0] if o.seconds else 0.0, default=None)
    return Advice(options, smallest, fastest, data_notes(run, data))


def to_estimate(resolved: Resolved, target: Target, time: Timing) -> Estimate:
    """The `status.estimate` the trainer reports."""
    return Estimate(
        peak_gib_per_gpu=round(resolved.memory.total / GIB, 2),
        gpu_gib=round(target.memory / GIB, 2) if target.memory else None,
        fits=resolved.fits,
        batch_size=resolved.batch_size,
        gradient_checkpointing=resolved.gradient_checkpointing,
        worst_case_tokens=resolved.memory.tokens,
        total_steps=time.steps,
        expected_seconds_min=round(time.seconds[0]) if time.seconds else None,
        expected_seconds_max=round(time.seconds[1]) if time.seconds else None,
        gpu_hours_max=float(f"{time.gpu_hours[1]:.4g}") if time.gpu_hours else None,
    )


def sequence_lengths(run: RunConfig, train: Any) -> list[int]:
    """Tokens of each training sequence of a prepared split; for a preference pair its longer
    sequence (the prompt with the longer answer: the pair is padded to it)."""
    if not run.preference:
        return [len(ids) for ids in train["input_ids"]]
    return [
        len(prompt) + max(len(chosen), len(rejected))
        for prompt, chosen, rejected in zip(
            train["prompt_ids"], train["chosen_ids"], train["rejected_ids"], strict=True
        )
    ]


def data_of(lengths: Sequence[int]) -> Data:
    """Data facts from the training split's token lengths."""
    return Data(tuple(int(n) for n in lengths))


def describe_parts(memory: MemoryEstimate) -> dict[str, float]:
    """The breakdown in GiB (zero parts left out), overhead included."""
    parts: dict[str, Any] = {**memory.parts, **memory.overhead}
    return {k: round(v / GIB, 2) for k, v in parts.items() if v}
