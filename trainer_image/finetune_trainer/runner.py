"""One fine-tuning run, start to finish: lock the output -> data -> same run? -> model ->
method -> baseline -> train (or resume) -> evaluate -> save.

`execute()` is shared by the container entrypoint (`python -m finetune_trainer`) and the local
CLI (`finetune run`); it reports through a `ProgressTracker` and returns a `Summary`.
Errors the user must fix (config, dataset, model source, an output in use or holding another
run) raise `InvalidInputError`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from finetune_trainer import fingerprint, hyper, storage, token_batches
from finetune_trainer.callbacks import PreemptionFlag, RunCallback, StopRequestedError
from finetune_trainer.checkpoints import BestMetric, CheckpointStore
from finetune_trainer.config import ConfigError, RunConfig
from finetune_trainer.distributed import Rank, barrier, init_group, settle, smallest
from finetune_trainer.errors import InvalidInputError
from finetune_trainer.experiments import (
    Closing,
    Experiments,
    JobIdentity,
    numeric,
    preflight,
    read_samples,
)
from finetune_trainer.generation import GenerationEval, held_out
from finetune_trainer.history import History
from finetune_trainer.lock import OutputLock, OutputLockedError, hold_output
from finetune_trainer.methods import (
    MethodError,
    ParamCount,
    apply_method,
    count_parameters,
    untuned,
)
from finetune_trainer.models import (
    LocalModel,
    ModelLoadError,
    fetch_model,
    load_model,
    load_tokenizer,
    torch_dtype,
)
from finetune_trainer.output_files import join
from finetune_trainer.outputs import (
    ADAPTER_DIR,
    MODEL_DIR,
    plot_loss,
    save_merged,
    save_weights,
    weights_dir,
    write_metrics,
    write_model_card,
)
from finetune_trainer.planning.plan import ModelFacts, Target, sequence_lengths
from finetune_trainer.planning.plan import Resolved as Planned
from finetune_trainer.progress import (
    ENV_MAX_GPU_HOURS,
    CheckpointInfo,
    Estimate,
    Outcome,
    Phase,
    Summary,
    TrackerInfo,
)
from finetune_trainer.strategy import Strategy
from finetune_trainer.strategy import resolve as resolve_strategy
from finetune_trainer.strategy import training_arguments as strategy_arguments
from finetune_trainer.tracker import ProgressTracker

log = logging.getLogger(__name__)

ARTIFACTS = (
    ADAPTER_DIR,
    MODEL_DIR,
    "merged",
    "metrics.json",
    "history.jsonl",
    "loss.png",
    "README.md",
    "samples.jsonl",
    "tensorboard",
    "wandb",
)


@dataclass
class RunContext:
    """Where a run writes and how it is observed."""

    name: str
    tracker: ProgressTracker = field(default_factory=ProgressTracker)
    preemption: PreemptionFlag = field(default_factory=PreemptionFlag)
    scratch: Path | None = None
    rank: Rank = field(default_factory=Rank.from_env)  # this worker (rank 0 of 1 when alone)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _local_output(run: RunConfig, ctx: RunContext) -> Path:
    if storage.is_local(run.output.uri):
        path = Path(storage.resolve(run.output.uri))
    else:
        base = ctx.scratch or Path(tempfile.gettempdir()) / "finetune-run"
        path = base / ctx.name / "output"
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_dtype(run: RunConfig, precision: str) -> Any:
    """The dtype the base model is loaded in for a training precision."""
    if run.model.dtype != "auto":
        return torch_dtype(run.model.dtype)
    if precision == "bf16":
        return torch_dtype("bf16")
    if precision == "fp16" and run.method.type != "full":
        return torch_dtype("fp16")  # frozen base in fp16; peft keeps adapters in fp32
    return torch_dtype("fp32")


def padding_free(
    run: RunConfig, data_parallel: bool = False, batch_size: int | None = None
) -> bool:
    """Whether causal-LM batches are concatenated into one row with position_ids (no padding).

    auto: on for causal LM except prefix/prompt tuning (their virtual tokens are per row); off
    under `data_parallel` (torch DataParallel splits a batch by rows: one row would all land
    on the first GPU) and at `batch_size` 1 (a lone example has no padding to remove). Packing
    implies it. The attention layers see the sequence boundaries through position_ids
    (flash-attention varlen, FlexAttention's document mask, or SDPA/eager with a materialised
    block-diagonal mask). Never for dpo/orpo: TRL pads each pair's sequences to one length."""
    if run.task != "causal-lm" or run.preference:
        return False
    if run.dataset.packing:
        return True
    if run.dataset.padding_free == "auto":
        return run.method.type not in ("prefix", "prompt") and not data_parallel and batch_size != 1
    return bool(run.dataset.padding_free)


def data_parallel(model: Any) -> bool:
    """Whether transformers will split each batch across this process's GPUs with torch
    DataParallel: one process (not a launched worker, which has one GPU), more than one GPU
    visible and a model that is not k-bit quantized."""
    import torch

    kbit = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    alone = not Rank.from_env().is_distributed
    return alone and torch.cuda.device_count() > 1 and not kbit


def use_liger(run: RunConfig, device: str) -> bool:
    """Liger's Triton kernels (RMSNorm, RoPE, SwiGLU; TRL keeps its own chunked LM-head loss,
    which already avoids full logits, instead of Liger's fused linear cross-entropy). auto: on
    with CUDA when liger-kernel is installed (the gpu extra); true where it cannot run is the
    user's error."""
    import importlib.util

    installed = importlib.util.find_spec("liger_kernel") is not None
    if run.training.liger_kernel == "auto":
        return device == "cuda" and installed
    if run.training.liger_kernel and device != "cuda":
        raise InvalidInputError(
            "training.ligerKernel: Liger's Triton kernels need a CUDA GPU; set it to auto or false"
        )
    if run.training.liger_kernel and not installed:
        raise InvalidInputError(
            "training.ligerKernel: liger-kernel is not installed in this image (pip install "
            "'finetune[gpu]'); set it to auto or false"
        )
    return bool(run.training.liger_kernel)


def best_metric(run: RunConfig) -> BestMetric:
    """What the best checkpoint is: training.earlyStopping.metric, else the lowest eval loss."""
    es = run.training.early_stopping
    return es.metric if es is not None else "eval_loss"


def _training_args(
    run: RunConfig,
    hp: hyper.Resolved,
    batch_size: int,
    out_dir: Path,
    has_eval: bool,
    device: str,
) -> dict[str, Any]:
    """TrainingArguments of a single process (the strategy adds its own)."""
    t = run.training
    eval_strategy = "no"
    eval_steps = None
    if has_eval:
        eval_strategy = "steps" if (t.eval_steps or t.early_stopping) else "epoch"
        eval_steps = t.eval_steps or (t.save_steps if t.early_stopping else None)
    args: dict[str, Any] = {
        "output_dir": str(out_dir),
        "num_train_epochs": hp.epochs,
        "max_steps": t.max_steps or -1,
        "per_device_train_batch_size": batch_size,
        "per_device_eval_batch_size": batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "learning_rate": hp.learning_rate,
        "lr_scheduler_type": t.scheduler,
        "warmup_steps": t.warmup_ratio,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "bf16": hp.precision == "bf16",
        "fp16": hp.precision == "fp16",
        "use_cpu": device == "cpu",
        "gradient_checkpointing": hp.gradient_checkpointing,
        "seed": t.seed,
        "data_seed": t.seed,
        "logging_steps": t.logging_steps,
        "eval_strategy": eval_strategy,
        "eval_steps": eval_steps,
        "save_strategy": "steps",
        "save_steps": t.save_steps,
        "save_total_limit": t.save_total_limit,
        "metric_for_best_model": best_metric(run) if has_eval else None,
        "greater_is_better": best_metric(run) == "eval_accuracy",
        "load_best_model_at_end": t.early_stopping is not None,
        "report_to": "none",
        "disable_tqdm": True,
        "include_num_input_tokens_seen": "non_padding",
        "optim": "adamw_torch_fused" if device == "cuda" else "adamw_torch",
        "dataloader_num_workers": 0,
    }
    if device == "cuda":
        args["tf32"] = True
    if use_liger(run, device):
        args["use_liger_kernel"] = True
    return args


def _build_trainer(
    run: RunConfig,
    model: Any,
    tokenizer: Any,
    prepared: Any,
    args: dict[str, Any],
    callbacks: list[Any],
    batch_tokens: int | None = None,
) -> Any:
    """The Trainer of the run: TRL's SFTTrainer for causal LM (batches of `batch_tokens`
    tokens when set, else rows), TRL's DPO/ORPO trainers for a preference
    objective, transformers' Trainer for classification."""
    if run.preference:
        from finetune_trainer import preference

        return preference.build_trainer(run, model, tokenizer, prepared, args, callbacks)
    if run.task == "sequence-classification":
        import numpy as np
        from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

        def accuracy(pred: Any) -> dict[str, float]:
            logits, labels = pred
            return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}

        return Trainer(
            model=model,
            args=TrainingArguments(**args),
            train_dataset=prepared.train,
            eval_dataset=prepared.eval,
            processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=accuracy,
            callbacks=callbacks,
        )
    from trl import SFTConfig, SFTTrainer

    parallel = data_parallel(model)
    rows = None if batch_tokens else args["per_device_train_batch_size"]
    flat = padding_free(run, parallel, rows)
    if flat and parallel:
        log.warning(
            "dataset.paddingFree: true with several GPUs in one process: DataParallel cannot "
            "split a single-row batch, so the first GPU gets all of it"
        )
    config = SFTConfig(
        **args,
        # the data pipeline already truncated to maxSeqLength; TRL enforces max_length only
        # by packing, and refuses it for padding-free batches without packing
        max_length=run.dataset.max_seq_length if run.dataset.packing or not flat else None,
        packing=run.dataset.packing,
        padding_free=flat,
        completion_only_loss=True,
        dataset_num_proc=None,
    )
    trainer_class: Any = SFTTrainer
    if batch_tokens:
        trainer_class = token_batches.with_token_batches(SFTTrainer)
        log.info("batches of at most %d tokens (training.batchTokens)", batch_tokens)
    trainer = trainer_class(
        model=model,
        args=config,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.batch_tokens = batch_tokens
    return trainer


def restore_finished(trainer: Any, checkpoint: Path) -> bool:
    """If `checkpoint` already reached the run's maxSteps, load its weights and trainer state
    instead of training, and return True. (Resumed mid-epoch at maxSteps, transformers would
    still take one more optimizer step; epoch-based runs end on an epoch and need no help.)"""
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    if not 0 < trainer.args.max_steps <= state.global_step:
        return False
    trainer._load_from_checkpoint(str(checkpoint))  # the weights, as train() would load them
    trainer.state = state
    return True


def logged_train_loss(log_history: list[dict[str, Any]]) -> float | None:
    """Mean training loss over every logged step of the run, the steps before a resume
    included (each logged `loss` is the mean of its window, weighted by its steps). For a
    resumed run, transformers' `training_loss` covers only the steps of that call: 0.0 for a
    run resumed at its last checkpoint."""
    last_step, steps, total = 0, 0, 0.0
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            window = entry["step"] - last_step
            total += float(entry["loss"]) * window
            steps += window
            last_step = entry["step"]
    return total / steps if steps else None


# What an evaluation reports: loss; accuracy (classification); the share of next tokens
# predicted right (causal LM, from TRL); a preference trainer's reward accuracy and margin (as
# TRL names them: our name). Timings, token counts and entropy are left out.
EVAL_RESULTS = {
    "loss": "loss",
    "accuracy": "accuracy",
    "mean_token_accuracy": "mean_token_accuracy",
    "rewards/accuracies": "reward_accuracy",
    "rewards/margins": "reward_margin",
}


def evaluation_metrics(
    raw: dict[str, float], prefix: str, task: str, preference: bool = False
) -> dict[str, float]:
    """The results of one evaluation (`EVAL_RESULTS`), and the perplexity (exp of the loss)
    for causal LM; a classifier's loss and a preference loss have no perplexity."""
    metrics = {
        f"{prefix}_{ours}": raw[f"{prefix}_{k}"]
        for k, ours in EVAL_RESULTS.items()
        if f"{prefix}_{k}" in raw
    }
    loss = metrics.get(f"{prefix}_loss")
    if task == "causal-lm" and loss is not None and not preference:
        metrics[f"{prefix}_perplexity"] = math.exp(min(loss, 50.0))
    return metrics


def _evaluate(
    trainer: Any, dataset: Any, prefix: str, run: RunConfig, *, base: bool
) -> dict[str, float]:
    """Evaluate on `dataset`; `base` evaluates the untuned model (adapter disabled)."""
    with untuned(trainer.model) if base else contextlib.nullcontext():
        raw: dict[str, float] = trainer.evaluate(dataset, metric_key_prefix=prefix)
    return evaluation_metrics(raw, prefix, run.task, run.preference)


def preference_metrics(
    run: RunConfig, model: Any, tokenizer: Any, prepared: Any, *, base: bool
) -> dict[str, float]:
    """How `model` ranks the held-out pairs (validation split, else test split): share of
    pairs it prefers chosen on and the mean margin; `base` scores the untuned model, under
    `baseline_*`. Empty for a run that is not preference tuning or has no held-out pairs."""
    split = prepared.eval if prepared.eval is not None else prepared.test
    if not run.preference or split is None:
        return {}
    from finetune_trainer.preference import score_pairs

    with untuned(model) if base else contextlib.nullcontext():
        scores = score_pairs(model, tokenizer, split)
    return scores.metrics("baseline_" if base else "")


def generation_eval(run: RunConfig, prepared: Any, tokenizer: Any) -> GenerationEval | None:
    """The configured generation eval over the validation split (else the test split); raises
    InvalidInputError when no held-out example has a prompt to answer."""
    spec = run.evaluation.generation if run.evaluation is not None else None
    if spec is None:
        return None
    split = prepared.eval if prepared.eval is not None else prepared.test
    held = held_out(split, tokenizer, spec.examples)
    if not held.prompts:
        raise InvalidInputError(
            f"evaluation.generation: no held-out example has a prompt and a completion "
            f"(dataset format {prepared.format}); use alpaca, chat or completion data"
        )
    return GenerationEval(held, spec.max_new_tokens)


def _publish(out: Path, uri: str) -> None:
    """Copy the finished artifacts to a remote output (checkpoints are already there)."""
    if storage.is_local(uri):
        return
    for name in ARTIFACTS:
        path = out / name
        if path.exists():
            storage.upload(path, join(uri, name))


def data_summary(prepared: Any) -> str:
    """One line: detected format and examples/tokens per split."""
    splits = ", ".join(
        f"{name} {s.examples:,} examples / {s.tokens:,} tokens"
        for name, s in prepared.stats.splits.items()
    )
    return f"{prepared.format} format; {splits}"


def _card_stats(stats: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, s in stats.splits.items():
        out[f"{name} examples"] = s.examples
        out[f"{name} tokens"] = s.tokens
    out["truncated"] = stats.truncated
    out["dropped"] = stats.dropped
    return out


def prepare_data(run: RunConfig, local: LocalModel) -> tuple[Any, Any]:
    """Load the tokenizer and prepare (validate, split, tokenize) the dataset."""
    from finetune_trainer.data import DatasetError, prepare_dataset

    tokenizer = load_tokenizer(local, run.model)
    try:
        prepared = prepare_dataset(
            run.dataset,
            run.task,
            tokenizer,
            seed=run.training.seed,
            objective=run.training.objective,
        )
    except DatasetError as exc:
        raise InvalidInputError(str(exc)) from exc
    return tokenizer, prepared


def planned_epochs(trainer: Any, epochs: float) -> float:
    """Passes over the training data the run is set up for: with maxSteps (which transformers
    follows instead of epochs), maxSteps / optimizer steps per epoch; else `epochs`."""
    if trainer.args.max_steps <= 0:
        return epochs
    batches = len(trainer.get_train_dataloader())
    per_epoch = max(math.ceil(batches / trainer.args.gradient_accumulation_steps), 1)
    return float(trainer.args.max_steps / per_epoch)


# -- the steps of a run ----------------------------------------------------------------------
@dataclass
class _Data:
    """The tokenizer, the prepared dataset and the generation eval of a run."""

    model: LocalModel
    tokenizer: Any
    prepared: Any
    generation: GenerationEval | None


@dataclass
class _Model:
    """The model to train, with its method applied, and what was resolved for it."""

    model: Any
    params: ParamCount
    hp: hyper.Resolved
    batch_size: int
    device: str
    strategy: Strategy
    batch_tokens: int | None = None  # tokens per device batch, instead of batch_size rows


def _load_data(run: RunConfig, ctx: RunContext, out: Path) -> _Data:
    """Fetch the tokenizer, validate and tokenize the dataset, check the generation eval."""
    ctx.tracker.phase(Phase.VALIDATING_DATA, "fetching the model's tokenizer and the dataset")
    local = fetch_model(run.model, out.parent / ".cache")  # ModelLoadError: invalid input
    tokenizer, prepared = prepare_data(run, local)
    line = data_summary(prepared)
    ctx.tracker.update(message=line)
    log.info("dataset: %s", line)
    generation = generation_eval(run, prepared, tokenizer)  # checked before the model loads
    return _Data(local, tokenizer, prepared, generation)


def _check_same_run(
    run: RunConfig, identity: fingerprint.Fingerprint, store: CheckpointStore
) -> None:
    """Refuse an output that holds another run's checkpoints or results."""
    try:
        fingerprint.check(run.output.uri, identity, has_checkpoints=bool(store.complete()))
    except fingerprint.DifferentRunError as exc:
        raise InvalidInputError(str(exc)) from exc


@dataclass(frozen=True)
class PlannedRun:
    """The estimate of a run on this machine, made before any weights are loaded."""

    resolved: Planned
    target: Target
    facts: ModelFacts
    estimate: Estimate


# What a config the planner cannot read raises (missing or odd dimensions); a model it cannot
# plan still trains, without an estimate (InvalidInputError, the user's, still stops the run).
UNPLANNABLE = (TypeError, ValueError, AttributeError, KeyError, NotImplementedError)


def _gpu(local_rank: int) -> tuple[int, str]:
    """Total memory (bytes) and name of this worker's GPU."""
    import torch

    return int(torch.cuda.mem_get_info(local_rank)[1]), torch.cuda.get_device_name(local_rank)


def plan_training(
    run: RunConfig,
    config: Any,
    lengths: list[int],
    device: str,
    rank: Rank | None = None,
    num_labels: int = 2,
) -> PlannedRun:
    """Estimate the run from the model's config and the data's token lengths: per-GPU peak
    memory, whether it fits this worker's GPU, batch size and checkpointing for `auto`, steps
    and duration (finetune_trainer.planning)."""
    from finetune_trainer.planning.facts import model_facts
    from finetune_trainer.planning.gpus import gpu_type
    from finetune_trainer.planning.plan import data_of, resolve, timing, to_estimate

    rank = rank or Rank()
    facts = model_facts(config, run, num_labels)
    if device == "cuda":
        memory, name = _gpu(rank.local_rank)
        target = Target(rank.local_world_size, rank.world_size // rank.local_world_size, memory)
        target = replace(target, gpu=gpu_type(name))
    else:
        target = Target(0, rank.world_size)
    data = data_of(lengths)
    resolved = resolve(run, facts, target, data)
    estimate = to_estimate(resolved, target, timing(run, facts, target, data, resolved.batch_size))
    return PlannedRun(resolved, target, facts, estimate)


def check_plan(run: RunConfig, config: Any, planned: PlannedRun, lengths: list[int]) -> None:
    """Refuse (InvalidInputError) a run whose worst case does not fit this GPU, naming what
    would, or whose expected GPU-hours exceed the platform's cap ($FINETUNE_MAX_GPU_HOURS)."""
    est = planned.estimate
    if planned.resolved.fits is False:
        from finetune_trainer.planning.facts import method_facts
        from finetune_trainer.planning.plan import advise, data_of

        advice = advise(run, method_facts(config, run), planned.target, data_of(lengths))
        fitting = "; ".join(o.describe() for o in advice.options) or "none of full, lora, qlora"
        raise InvalidInputError(
            f"does not fit: the run needs about {est.peak_gib_per_gpu:.1f} GiB per GPU in the "
            f"worst case (batch {est.batch_size}, {est.worst_case_tokens} tokens, "
            f"checkpointing {'on' if est.gradient_checkpointing else 'off'}) and this GPU has "
            f"{est.gpu_gib:.1f} GiB; what fits GPUs like it: {fitting} (see finetune plan; "
            "lower training.batchSize or dataset.maxSeqLength"
            + ("" if est.gradient_checkpointing else ", or turn training.gradientCheckpointing on")
            + ")"
        )
    cap = os.environ.get(ENV_MAX_GPU_HOURS)
    if cap and est.gpu_hours_max is not None and est.gpu_hours_max > float(cap):
        raise InvalidInputError(
            f"over the platform's cap: the run is expected to take up to "
            f"{est.gpu_hours_max:.1f} GPU-hours and the cap per job is {float(cap):g}; "
            "train on less data (training.maxSteps, epochs) or ask the platform team"
        )


def training_setup(
    run: RunConfig,
    planned: PlannedRun | None,
    n_train: int,
    device: str,
    load: Callable[[Any], Any],
) -> tuple[Any, hyper.Resolved]:
    """Resolve the hyperparameters (from the estimate), load the base model with `load(dtype)`,
    turn on gradient checkpointing and apply the method: the model to train, as production
    and the benchmark build it."""
    hp = hyper.resolve(run, n_train, device, planned.resolved if planned else None)
    model = load(load_dtype(run, hp.precision))
    if hp.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model = apply_method(run, model, gradient_checkpointing=hp.gradient_checkpointing)
    return model, hp


def _load_model(run: RunConfig, ctx: RunContext, data: _Data) -> _Model:
    """Estimate, seed, load the base model, apply the method and settle the batch size."""
    from transformers import set_seed

    from finetune_trainer.planning.source import read_config

    device = _device()
    lengths = sequence_lengths(run, data.prepared.train)
    labels = len(data.prepared.label_names or ()) or 2
    ctx.tracker.phase(Phase.LOADING_MODEL, f"estimating memory and time; {data.model.description}")
    planned: PlannedRun | None = None
    try:
        config = read_config(data.model, run.model)
        planned = plan_training(run, config, lengths, device, ctx.rank, labels)
    except UNPLANNABLE as exc:  # an architecture the planner cannot read: train without
        log.warning("no memory estimate for this model (%s); auto uses its defaults", exc)
    if planned is not None:
        ctx.tracker.update(estimate=planned.estimate)
        log.info("estimate: %s", planned.estimate.to_json())
        check_plan(run, config, planned, lengths)
    ctx.tracker.phase(Phase.LOADING_MODEL, data.model.description)
    set_seed(run.training.seed)  # the new head and the adapter start from the seed's weights

    def load(dtype: Any) -> Any:
        return load_model(data.model, run, dtype=dtype, label_names=data.prepared.label_names)

    try:
        model, hp = training_setup(run, planned, len(lengths), device, load)
    except (ModelLoadError, MethodError, ConfigError) as exc:
        raise InvalidInputError(str(exc)) from exc
    params = count_parameters(model)
    log.info("%s", params)
    strategy = _strategy(run, ctx, params, device)
    batch_size = hp.batch_size
    tokens = hyper.batch_tokens(
        run,
        device,
        attention=getattr(model.config, "_attn_implementation", None),
        padding_free=padding_free(run, data_parallel(model)),
    )
    if tokens is not None and run.training.batch_tokens == "auto" and not strategy.fsdp:
        _to_gpu(model, ctx)
        tokens = smallest(hyper.probe_batch_tokens(model, tokens, run.dataset.max_seq_length))
        log.info("auto token budget: %d tokens per batch and worker", tokens)
    if tokens is not None:  # rows only size the evaluation batches and the logs
        batch_size = token_batches.mean_rows(data.prepared.train, tokens)
    if batch_size is None and strategy.fsdp:  # the unsharded model says nothing of a shard
        batch_size = min(hyper.CPU_AUTO_BATCH, len(data.prepared.train))
    if batch_size is None:
        _to_gpu(model, ctx)
        batch_size = hyper.probe_batch_size(model, run.dataset.max_seq_length, hp.probe_start)
        batch_size = hyper.pairs_per_batch(run, batch_size)
    batch_size = smallest(batch_size)  # what every GPU of the run can hold
    if hp.batch_size is None and tokens is None:
        log.info("auto batch size: %d per worker", batch_size)
    return _Model(model, params, hp, batch_size, device, strategy, tokens)


def _to_gpu(model: Any, ctx: RunContext) -> None:
    """Place the model on this worker's GPU before probing (k-bit models are placed already
    and refuse .to)."""
    if next(model.parameters()).device.type != "cuda":
        model.to(f"cuda:{ctx.rank.local_rank}")


def _strategy(run: RunConfig, ctx: RunContext, params: ParamCount, device: str) -> Strategy:
    """DDP or FSDP for a run of several workers (auto: from the model's size and the GPU)."""
    memory = None
    if device == "cuda":
        import torch

        memory = int(torch.cuda.mem_get_info()[1])
    chosen = resolve_strategy(run, ctx.rank, params.total, memory)
    if chosen.kind != "single":
        log.info("%s over %d workers (%s)", chosen.kind.upper(), chosen.world_size, chosen.reason)
    return chosen


def _baseline(
    run: RunConfig,
    ctx: RunContext,
    trainer: Any,
    data: _Data,
    history: History,
    sharded: bool = False,
) -> dict[str, Any]:
    """Evaluate the untuned model: loss (and accuracy) on the validation split, answers to
    the generation eval's prompts. Returns the `baseline_*` metrics.

    `sharded` (FSDP): accelerate cannot evaluate an FSDP2 model before training prepared it,
    so the untuned model is evaluated at step 0 of training instead (`eval_on_start`: the
    model is then still the base, since FSDP never trains prefix or prompt tuning) and read
    back from the log history (`baseline_from_history`)."""
    metrics: dict[str, Any] = {}
    if data.prepared.eval is not None and not sharded:
        ctx.tracker.phase(Phase.EVALUATING, "baseline: the untuned model on the validation split")
        base = _evaluate(trainer, data.prepared.eval, "eval", run, base=True)
        metrics.update({f"baseline_{k}": v for k, v in base.items()})
        history.baseline = {"step": 0, "epoch": 0.0, **base}
        # accelerate marks a model it prepared for evaluation as prepared, and would then not
        # wrap it for DDP in train(): every rank would train alone. Let train() prepare it.
        trainer.model._is_accelerate_prepared = False
    if run.preference and (data.prepared.eval is not None or data.prepared.test is not None):
        ctx.tracker.phase(Phase.EVALUATING, "baseline: how the untuned model ranks held-out pairs")
        metrics.update(
            preference_metrics(run, trainer.model, data.tokenizer, data.prepared, base=True)
        )
    if data.generation is not None and sharded:
        log.warning("evaluation.generation: skipped (FSDP shards the model: it cannot generate)")
        data.generation = None
    if data.generation is not None:
        n = len(data.generation.held.prompts)
        ctx.tracker.phase(Phase.EVALUATING, f"baseline: the untuned model answers {n} prompts")
        data.generation.answer_untuned(trainer.model, data.tokenizer)
    return metrics


def _resume_path(ctx: RunContext, store: CheckpointStore) -> Path | None:
    """The checkpoint to resume from, fetched once per node; refused when it was written by
    another number of workers (the global batch, the data order and FSDP's shards depend on
    it)."""
    rank = ctx.rank
    resume = store.resume_path(fetch=rank.local_rank == 0)
    if rank.is_distributed:
        barrier()  # every node has it locally
        resume = store.resume_path(fetch=False)
    newest = store.complete()[-1] if resume is not None else None
    if newest is not None and newest.world_size not in (None, rank.world_size):
        raise InvalidInputError(
            f"checkpoint-{newest.step} was written by {newest.world_size} workers and this run "
            f"has {rank.world_size}: resume with the same number (resources.nodes x gpus, or "
            "--nproc-per-node), or start over with another output"
        )
    return resume


def _train(
    run: RunConfig,
    ctx: RunContext,
    trainer: Any,
    store: CheckpointStore,
    history: History,
    resume: Path | None,
    sharded: bool = False,
) -> tuple[Any, str | None]:
    """Train from scratch or from `resume`, the newest complete checkpoint (or, when that one
    already reached maxSteps, just load it). Returns the train() result (None when nothing was
    trained) and the name of the checkpoint resumed from. `sharded` (FSDP): the baseline is
    the evaluation at step 0 of a run from scratch."""
    from transformers import EarlyStoppingCallback

    trainer.args.eval_on_start = sharded and resume is None and trainer.eval_dataset is not None
    if resume is not None:
        log.info("resuming from %s", resume.name)
        ctx.tracker.phase(Phase.LOADING_MODEL, f"resuming from {resume.name}")
        if restore_finished(trainer, resume):
            log.info("%s already reached training.maxSteps: nothing left to train", resume.name)
            if ctx.rank.is_main:
                history.restart(trainer.state.log_history)
            return None, resume.name
    es = run.training.early_stopping
    if es is not None:  # during training only: it watches the validation split's metric
        trainer.add_callback(
            EarlyStoppingCallback(
                early_stopping_patience=es.patience, early_stopping_threshold=es.threshold
            )
        )
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.remove_callback(EarlyStoppingCallback)
    return result, resume.name if resume else None


# What a run was doing in each phase before training, for "stopped while ...".
_ACTIVITY = {
    Phase.STARTING: "waiting for the output location",
    Phase.VALIDATING_DATA: "validating the data",
    Phase.LOADING_MODEL: "loading the model",
}


def _stopped_before_training(run: RunConfig, ctx: RunContext, store: CheckpointStore) -> Summary:
    """A stop requested before training (re)started: nothing new to save, nothing lost."""
    progress = ctx.tracker.snapshot()
    activity = _ACTIVITY.get(progress.phase) or f"{progress.phase.value} ({progress.message})"
    checkpoints = store.complete()
    newest = checkpoints[-1] if checkpoints else None
    next_run = (
        f"running again resumes from checkpoint-{newest.step}"
        if newest is not None
        else "no checkpoint yet; running again starts from scratch"
    )
    message = f"stopped while {activity}: nothing lost; {next_run}"
    ctx.tracker.phase(Phase.PREEMPTED, message)
    return Summary(
        outcome=Outcome.PREEMPTED,
        reason="Preempted",
        message=message,
        output_uri=run.output.uri,
        last_checkpoint=newest,
        steps=newest.step if newest is not None else 0,
    )


def _preempted(
    run: RunConfig,
    ctx: RunContext,
    state: Any,
    checkpoints: list[CheckpointInfo],
    resumed: str | None,
) -> Summary:
    """Stopped during training: the checkpoint saved at the stop is the one to resume from."""
    newest = checkpoints[-1] if checkpoints else None
    next_run = (
        f"checkpoint-{newest.step} is complete; running again resumes from it"
        if newest is not None
        else "no checkpoint was saved; running again starts from scratch"
    )
    since = f" (resumed from {resumed})" if resumed else ""
    message = f"stopped at step {state.global_step} of {state.max_steps}{since}; {next_run}"
    ctx.tracker.phase(Phase.PREEMPTED, message)
    return Summary(
        outcome=Outcome.PREEMPTED,
        reason="Preempted",
        message=message,
        output_uri=run.output.uri,
        last_checkpoint=newest,
        steps=state.global_step,
        trained_tokens=state.num_input_tokens_seen or None,
    )


def _final_metrics(
    run: RunConfig, ctx: RunContext, trainer: Any, data: _Data, out: Path
) -> dict[str, Any]:
    """Evaluate the trained model: validation and test splits, generation eval."""
    metrics: dict[str, Any] = {}
    prepared = data.prepared
    for split, dataset in (("eval", prepared.eval), ("test", prepared.test)):
        if dataset is not None:
            name = "validation" if split == "eval" else "test"
            ctx.tracker.phase(Phase.EVALUATING, f"{name} split")
            metrics.update(_evaluate(trainer, dataset, split, run, base=False))
    if run.preference and (prepared.eval is not None or prepared.test is not None):
        ctx.tracker.phase(Phase.EVALUATING, "how the tuned model ranks held-out pairs")
        metrics.update(preference_metrics(run, trainer.model, data.tokenizer, prepared, base=False))
    if data.generation is not None and ctx.rank.is_main:  # rank 0 has the whole (DDP) model
        n = len(data.generation.held.prompts)
        ctx.tracker.phase(Phase.EVALUATING, f"the tuned model answers {n} prompts")
        metrics.update(data.generation.answer_tuned(trainer.model, data.tokenizer, out))
    return metrics


def _save_outputs(
    run: RunConfig,
    ctx: RunContext,
    trainer: Any,
    data: _Data,
    metrics: dict[str, Any],
    out: Path,
    lock: OutputLock | None,
) -> str | None:
    """Write the weights, metrics, plot and model card, and publish them to a remote output
    (rank 0; under FSDP every rank first gives its shard of the weights). Returns the merged
    model's URI, if one was written."""
    state_dict = None
    if getattr(trainer, "is_fsdp_enabled", False):
        state_dict = trainer.accelerator.get_state_dict(trainer.model)  # a collective
    if lock is None:
        return None
    lock.ensure_held()  # another run took the output over: these results are not to be published
    ctx.tracker.phase(Phase.SAVING, f"{weights_dir(run)}, metrics and model card")
    path = save_weights(run, trainer.model, data.tokenizer, out, state_dict)
    merged_uri = None
    if run.output.merge_adapter:
        save_merged(trainer.model, data.tokenizer, out)
        merged_uri = join(run.output.uri, "merged")
    write_metrics(metrics, out)
    plot_loss(out / "history.jsonl", out)
    write_model_card(run, metrics, _card_stats(data.prepared.stats), out, ctx.name)
    _publish(out, run.output.uri)
    log.info("wrote %s", path)
    return merged_uri


def execute(run: RunConfig, ctx: RunContext) -> Summary:
    """Run the fine-tuning end to end and return the final summary. In a run of several
    workers every rank executes it; rank 0 alone holds the output and writes to it."""
    import datasets

    datasets.disable_progress_bars()
    init_group(run.training.distributed.timeout_seconds)
    out = _local_output(run, ctx)

    def on_wait(message: str) -> None:
        ctx.tracker.phase(Phase.STARTING, message)

    if not ctx.rank.is_main:
        settle(None)  # rank 0 holds the output
        return _execute_holding(run, ctx, out, None)
    try:
        with hold_output(run.output.uri, out, on_wait=on_wait) as lock:
            settle(None)
            return _execute_holding(run, ctx, out, lock)
    except OutputLockedError as exc:
        error = InvalidInputError(str(exc))
        settle(error)  # tells the other ranks, then raises it
        raise error from exc


def build_trainer(
    run: RunConfig,
    model: Any,
    tokenizer: Any,
    prepared: Any,
    hp: hyper.Resolved,
    batch_size: int,
    out_dir: Path,
    device: str,
    callbacks: list[Any],
    strategy: Strategy | None = None,
    rank: Rank | None = None,
    batch_tokens: int | None = None,
) -> Any:
    """The Trainer of a run (TRL's SFTTrainer for causal LM): its arguments for one process
    plus what the strategy adds, as production and the benchmark build it; batches of
    `batch_tokens` tokens when set (training.batchTokens), else rows of `batch_size`."""
    has_eval = prepared.eval is not None
    args = _training_args(run, hp, batch_size, out_dir, has_eval, device)
    args.update(
        strategy_arguments(
            run,
            strategy or Strategy("single"),
            rank or Rank(),
            model,
            device,
            hp.gradient_checkpointing,
        )
    )
    return _build_trainer(run, model, tokenizer, prepared, args, callbacks, batch_tokens)


def _trainer(
    run: RunConfig,
    ctx: RunContext,
    data: _Data,
    built: _Model,
    store: CheckpointStore,
    history: History,
    lock: OutputLock | None,
    reporters: list[Any],
) -> Any:
    """The Trainer of the run, reporting through RunCallback (and `reporters`: the experiment
    trackers' callbacks)."""
    from transformers import PrinterCallback

    callback = RunCallback(ctx.tracker, store, history, ctx.preemption, lock, ctx.rank)
    trainer = build_trainer(
        run,
        built.model,
        data.tokenizer,
        data.prepared,
        built.hp,
        built.batch_size,
        store.local_dir,
        built.device,
        [callback, *reporters],
        built.strategy,
        ctx.rank,
        built.batch_tokens,
    )
    trainer.remove_callback(PrinterCallback)  # RunCallback logs each step once, as text
    return trainer


def baseline_from_history(log_history: list[dict[str, Any]], task: str) -> dict[str, float]:
    """The `baseline_*` metrics of the evaluation at step 0 of training (FSDP's baseline)."""
    start = next((h for h in log_history if h.get("step") == 0 and "eval_loss" in h), None)
    if start is None:
        return {}
    return {f"baseline_{k}": v for k, v in evaluation_metrics(start, "eval", task).items()}


def _run_metrics(
    trainer: Any, result: Any, resumed: str | None, built: _Model, data: _Data, started: float
) -> dict[str, Any]:
    """The whole run's train loss, steps, tokens, parameters and runtime."""
    state = trainer.state
    metrics: dict[str, Any] = {}
    train_loss = (
        result.training_loss
        if result is not None and not resumed
        else logged_train_loss(state.log_history)
    )
    if train_loss is not None:
        metrics["train_loss"] = train_loss
    metrics.update(
        steps=state.global_step,
        epochs=round(state.epoch or 0.0, 4),
        trained_tokens=state.num_input_tokens_seen,
        trainable_params=built.params.trainable,
        total_params=built.params.total,
        runtime_seconds=round(time.monotonic() - started, 1),
        estimated_trained_tokens=data.prepared.stats.estimated_trained_tokens(
            planned_epochs(trainer, built.hp.epochs)
        ),
    )
    return metrics


@contextlib.contextmanager
def settled() -> Iterator[None]:
    """Every rank leaves the block together: all of them fine, or all raising (see
    `distributed.settle`), so no rank waits in a collective for one that gave up."""
    try:
        yield
    except Exception as exc:
        settle(exc)
        raise
    settle(None)


def hyperparameters(run: RunConfig, built: _Model, world_size: int) -> dict[str, Any]:
    """What the run trains with, every `auto` resolved (for the experiment trackers)."""
    t = run.training
    values: dict[str, Any] = {
        "task": run.task,
        "model": run.model.source,
        "method": run.method.type,
        "epochs": built.hp.epochs,
        "maxSteps": t.max_steps,
        "learningRate": built.hp.learning_rate,
        "batchSize": built.batch_size,
        "gradientAccumulationSteps": t.gradient_accumulation_steps,
        "globalBatchSize": built.batch_size * t.gradient_accumulation_steps * world_size,
        "workers": world_size,
        "strategy": built.strategy.kind,
        "precision": built.hp.precision,
        "gradientCheckpointing": built.hp.gradient_checkpointing,
        "scheduler": t.scheduler,
        "warmupRatio": t.warmup_ratio,
        "weightDecay": t.weight_decay,
        "seed": t.seed,
        "maxSeqLength": run.dataset.max_seq_length,
        "trainableParams": built.params.trainable,
        "totalParams": built.params.total,
    }
    for name in ("lora", "quantization", "prefix", "prompt"):
        section = getattr(run.method, name)
        if section is not None:
            values[name] = section.model_dump(by_alias=True, exclude_none=True)
    return {k: v for k, v in values.items() if v is not None}


def dataset_report(prepared: Any) -> dict[str, Any]:
    """Counts, tokens and what validation dropped or changed, by reason (for the trackers)."""
    return {
        "format": prepared.format,
        **prepared.stats.to_dict(),
        "validation": prepared.report.to_dict(),
    }


def _closing(summary: Summary, out: Path) -> Closing:
    """What the trackers record at the end: all of metrics.json, the samples and the weights'
    location for a success; the outcome and the step otherwise."""
    step = summary.steps or 0
    if summary.outcome != Outcome.SUCCEEDED:
        return Closing(summary.outcome, step)
    metrics_file = out / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    return Closing(
        summary.outcome,
        step,
        numeric(metrics.items()),
        read_samples(out / "samples.jsonl"),
        summary.adapter_uri or summary.model_uri,
    )


def _execute_holding(
    run: RunConfig, ctx: RunContext, out: Path, lock: OutputLock | None
) -> Summary:
    """`execute` once the output location is this run's (`lock`: None on ranks other than 0),
    reporting to the experiment trackers of spec.tracking (rank 0)."""

    def on_change(infos: list[TrackerInfo]) -> None:
        ctx.tracker.update(trackers=infos)

    identity = JobIdentity.from_env(ctx.name)
    experiments = Experiments(run, out, identity, ctx.rank.is_main, on_change)
    try:
        summary = _execute_tracked(run, ctx, out, lock, experiments)
    except BaseException:
        experiments.close(Closing(Outcome.FAILED, ctx.tracker.snapshot().step))
        raise
    experiments.close(_closing(summary, out))
    if not experiments.trackers:
        return summary
    return summary.model_copy(update={"trackers": experiments.infos()})


def _execute_tracked(
    run: RunConfig,
    ctx: RunContext,
    out: Path,
    lock: OutputLock | None,
    experiments: Experiments,
) -> Summary:
    """The run itself (see `_execute_holding`)."""
    started = time.monotonic()
    store = CheckpointStore(run.output.uri, out, best_metric(run))
    try:
        with settled():
            preflight(run.tracking)
            data = _load_data(run, ctx, out)
            identity = fingerprint.of_run(run, data.prepared)
            _check_same_run(run, identity, store)
        ctx.preemption.check()
        with settled():
            built = _load_model(run, ctx, data)
        ctx.preemption.check()
        history = History(out / "history.jsonl")
        trainer = _trainer(run, ctx, data, built, store, history, lock, experiments.callbacks())
        experiments.open(
            hyperparameters(run, built, ctx.rank.world_size), dataset_report(data.prepared)
        )
        sharded = built.strategy.fsdp
        metrics = _baseline(run, ctx, trainer, data, history, sharded)
        ctx.preemption.check()
        if ctx.rank.is_main:
            fingerprint.record(run.output.uri, identity)  # from here on the output is this run's
        with settled():
            resume = _resume_path(ctx, store)
        result, resumed = _train(run, ctx, trainer, store, history, resume, sharded)
        if ctx.preemption.is_set and result is not None:
            return _preempted(run, ctx, trainer.state, store.complete(), resumed)
        if sharded:
            metrics.update(baseline_from_history(trainer.state.log_history, run.task))
        metrics.update(_final_metrics(run, ctx, trainer, data, out))
    except StopRequestedError:
        return _stopped_before_training(run, ctx, store)
    metrics.update(_run_metrics(trainer, result, resumed, built, data, started))
    merged_uri = _save_outputs(run, ctx, trainer, data, metrics, out, lock)
    return _summary(run, metrics, built.params, store.complete(), merged_uri, resumed)


def _summary(
    run: RunConfig,
    metrics: dict[str, Any],
    params: ParamCount,
    checkpoints: list[CheckpointInfo],
    merged_uri: str | None,
    resumed: str | None,
) -> Summary:
    keep = (
        "eval_loss",
        "eval_perplexity",
        "baseline_eval_loss",
        "train_loss",
        "test_loss",
        "generation_rouge_l",
        "baseline_generation_rouge_l",
        "generation_bleu",
        "baseline_generation_bleu",
        "eval_accuracy",
        "baseline_eval_accuracy",
        "test_accuracy",
        "preference_accuracy",
        "baseline_preference_accuracy",
        "preference_margin",
        "baseline_preference_margin",
        "eval_reward_accuracy",
        "eval_reward_margin",
        "runtime_seconds",
    )
    weights_uri = join(run.output.uri, weights_dir(run))
    full = weights_dir(run) == MODEL_DIR
    return Summary(
        outcome=Outcome.SUCCEEDED,
        reason="Succeeded",
        message=f"resumed from {resumed}" if resumed else None,
        adapter_uri=None if full else weights_uri,
        model_uri=weights_uri if full else None,
        merged_model_uri=merged_uri,
        output_uri=run.output.uri,
        last_checkpoint=checkpoints[-1] if checkpoints else None,
        metrics={k: float(metrics[k]) for k in keep if metrics.get(k) is not None},
        trainable_params=params.trainable,
        total_params=params.total,
        trained_tokens=int(metrics["trained_tokens"]),
        steps=int(metrics["steps"]),
    )


def scratch_from_env() -> Path | None:
    """FINETUNE_SCRATCH: where remote outputs are staged (default: the system temp dir)."""
    value = os.environ.get("FINETUNE_SCRATCH")
    return Path(value) if value else None
