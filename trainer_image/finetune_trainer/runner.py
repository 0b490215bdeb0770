"""One fine-tuning run, start to finish: data -> model -> method -> train -> evaluate -> save.

`execute()` is shared by the container entrypoint (`python -m finetune_trainer`) and the local
CLI (`finetune run`); it reports through a `ProgressTracker` and returns a `Summary`.
Errors the user must fix (config, dataset, model source) raise `InvalidInputError`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_trainer import hyper, storage
from finetune_trainer.callbacks import PreemptionFlag, RunCallback
from finetune_trainer.checkpoints import CheckpointStore
from finetune_trainer.config import ConfigError, RunConfig
from finetune_trainer.errors import InvalidInputError
from finetune_trainer.generation import GenerationEval, held_out
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
from finetune_trainer.outputs import (
    plot_loss,
    save_adapter,
    save_merged,
    write_metrics,
    write_model_card,
)
from finetune_trainer.progress import Outcome, Phase, Summary
from finetune_trainer.tracker import ProgressTracker

log = logging.getLogger(__name__)

ARTIFACTS = (
    "adapter",
    "merged",
    "metrics.json",
    "history.jsonl",
    "loss.png",
    "README.md",
    "samples.jsonl",
)


@dataclass
class RunContext:
    """Where a run writes and how it is observed."""

    name: str
    tracker: ProgressTracker = field(default_factory=ProgressTracker)
    preemption: PreemptionFlag = field(default_factory=PreemptionFlag)
    scratch: Path | None = None


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


def _load_dtype(run: RunConfig, precision: str) -> Any:
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
    (flash-attention varlen, or SDPA/eager with a block-diagonal mask)."""
    if run.task != "causal-lm":
        return False
    if run.dataset.packing:
        return True
    if run.dataset.padding_free == "auto":
        return run.method.type not in ("prefix", "prompt") and not data_parallel and batch_size != 1
    return bool(run.dataset.padding_free)


def data_parallel(model: Any) -> bool:
    """Whether transformers will split each batch across this process's GPUs with torch
    DataParallel: more than one GPU visible and a model that is not k-bit quantized."""
    import torch

    kbit = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    return torch.cuda.device_count() > 1 and not kbit


def use_liger(run: RunConfig, device: str) -> bool:
    """Liger kernels: auto means on with CUDA when liger-kernel is installed."""
    if run.training.liger_kernel == "auto":
        import importlib.util

        return device == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    return bool(run.training.liger_kernel)


def _training_args(
    run: RunConfig,
    hp: hyper.Resolved,
    batch_size: int,
    out_dir: Path,
    has_eval: bool,
    device: str,
) -> dict[str, Any]:
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
        "metric_for_best_model": (t.early_stopping.metric if t.early_stopping else "eval_loss")
        if has_eval
        else None,
        "greater_is_better": bool(t.early_stopping and t.early_stopping.metric == "eval_accuracy"),
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
) -> Any:
    from transformers import EarlyStoppingCallback

    es = run.training.early_stopping
    if es is not None:
        callbacks = [
            *callbacks,
            EarlyStoppingCallback(
                early_stopping_patience=es.patience, early_stopping_threshold=es.threshold
            ),
        ]
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
    flat = padding_free(run, parallel, args["per_device_train_batch_size"])
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
    return SFTTrainer(
        model=model,
        args=config,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


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


def _evaluate(
    trainer: Any, model: Any, dataset: Any, prefix: str, *, base: bool
) -> dict[str, float]:
    """Evaluate on `dataset`; `base` evaluates the untuned model (adapter disabled)."""
    with untuned(model) if base else contextlib.nullcontext():
        metrics: dict[str, float] = trainer.evaluate(dataset, metric_key_prefix=prefix)
    loss = metrics.get(f"{prefix}_loss")
    if loss is not None:
        metrics[f"{prefix}_perplexity"] = math.exp(min(loss, 50.0))
    return metrics


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
            storage.upload(path, f"{uri.rstrip('/')}/{name}")


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
        prepared = prepare_dataset(run.dataset, run.task, tokenizer, seed=run.training.seed)
    except DatasetError as exc:
        raise InvalidInputError(str(exc)) from exc
    return tokenizer, prepared


def execute(run: RunConfig, ctx: RunContext) -> Summary:
    """Run the fine-tuning end to end and return the final summary."""
    import datasets
    from transformers import PrinterCallback

    datasets.disable_progress_bars()
    started = time.monotonic()
    tracker = ctx.tracker
    out = _local_output(run, ctx)
    try:
        tracker.phase(Phase.VALIDATING_DATA, "fetching the model's tokenizer and the dataset")
        local = fetch_model(run.model, out.parent / ".cache")
        tokenizer, prepared = prepare_data(run, local)
        line = data_summary(prepared)
        tracker.update(message=line)
        log.info("dataset: %s", line)
        generation = generation_eval(run, prepared, tokenizer)  # checked before the model loads

        device = _device()
        hp = hyper.resolve(run, len(prepared.train), device)
        tracker.phase(Phase.LOADING_MODEL, local.description)
        model = load_model(
            local, run, dtype=_load_dtype(run, hp.precision), label_names=prepared.label_names
        )
        if hp.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model = apply_method(run, model, gradient_checkpointing=hp.gradient_checkpointing)
    except (ModelLoadError, MethodError, ConfigError) as exc:
        raise InvalidInputError(str(exc)) from exc
    params = count_parameters(model)
    log.info("%s", params)
    batch_size = hp.batch_size
    if batch_size is None:
        if device == "cuda" and next(model.parameters()).device.type != "cuda":
            model.to("cuda")  # k-bit models are already placed (and refuse .to)
        batch_size = hyper.probe_batch_size(
            model, run.dataset.max_seq_length, min(hyper.GPU_AUTO_BATCH_START, len(prepared.train))
        )
        log.info("auto batch size: %d", batch_size)

    store = CheckpointStore(run.output.uri, out)
    callback = RunCallback(tracker, store, out / "history.jsonl", ctx.preemption)
    args = _training_args(run, hp, batch_size, store.local_dir, prepared.eval is not None, device)
    trainer = _build_trainer(run, model, tokenizer, prepared, args, [callback])
    trainer.remove_callback(PrinterCallback)  # RunCallback logs each step once, as text

    metrics: dict[str, Any] = {}
    if prepared.eval is not None:
        tracker.phase(Phase.EVALUATING, "baseline: the untuned model on the validation split")
        base = _evaluate(trainer, trainer.model, prepared.eval, "eval", base=True)
        metrics["baseline_eval_loss"] = base["eval_loss"]
        metrics["baseline_perplexity"] = base["eval_perplexity"]

    if generation is not None:
        n = len(generation.held.prompts)
        tracker.phase(Phase.EVALUATING, f"baseline: the untuned model answers {n} prompts")
        generation.answer_untuned(trainer.model, tokenizer)

    resume = store.resume_path()
    if resume:
        log.info("resuming from %s", resume.name)
    result = None
    trained = not ctx.preemption.is_set  # a notice during set-up: nothing new to save, stop now
    if trained and resume and restore_finished(trainer, resume):
        log.info("%s already reached training.maxSteps: nothing left to train", resume.name)
    elif trained:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    state = trainer.state
    checkpoints = store.complete()

    if ctx.preemption.is_set or not trained:
        tracker.phase(Phase.PREEMPTED, f"stopped at step {state.global_step}; checkpoint saved")
        return Summary(
            outcome=Outcome.PREEMPTED,
            reason="Preempted",
            message=f"stopped at step {state.global_step} of {state.max_steps}; will resume",
            output_uri=run.output.uri,
            last_checkpoint=checkpoints[-1] if checkpoints else None,
            steps=state.global_step,
            trained_tokens=state.num_input_tokens_seen or None,
        )

    train_loss = (
        result.training_loss
        if result is not None and not resume
        else logged_train_loss(state.log_history)
    )
    if train_loss is not None:
        metrics["train_loss"] = train_loss
    if prepared.eval is not None:
        tracker.phase(Phase.EVALUATING, "validation split")
        metrics.update(_evaluate(trainer, trainer.model, prepared.eval, "eval", base=False))
    if prepared.test is not None:
        tracker.phase(Phase.EVALUATING, "test split")
        metrics.update(_evaluate(trainer, trainer.model, prepared.test, "test", base=False))
    if generation is not None:
        n = len(generation.held.prompts)
        tracker.phase(Phase.EVALUATING, f"the tuned model answers {n} prompts")
        metrics.update(generation.answer_tuned(trainer.model, tokenizer, out))
    metrics = {k: v for k, v in metrics.items() if not k.endswith(("_runtime", "per_second"))}
    metrics.update(
        steps=state.global_step,
        epochs=round(state.epoch or 0.0, 4),
        trained_tokens=state.num_input_tokens_seen,
        trainable_params=params.trainable,
        total_params=params.total,
        runtime_seconds=round(time.monotonic() - started, 1),
        estimated_trained_tokens=prepared.stats.estimated_trained_tokens(hp.epochs),
    )

    tracker.phase(Phase.SAVING, "adapter, metrics and model card")
    adapter_dir = save_adapter(trainer.model, tokenizer, out)
    merged_uri = None
    if run.output.merge_adapter:
        save_merged(trainer.model, tokenizer, out)
        merged_uri = f"{run.output.uri.rstrip('/')}/merged"
    write_metrics(metrics, out)
    plot_loss(out / "history.jsonl", out)
    write_model_card(run, metrics, _card_stats(prepared.stats), out, ctx.name)
    _publish(out, run.output.uri)
    log.info("wrote %s", adapter_dir)
    return _summary(run, metrics, params, checkpoints, merged_uri)


def _summary(
    run: RunConfig,
    metrics: dict[str, Any],
    params: ParamCount,
    checkpoints: list[Any],
    merged_uri: str | None,
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
        "test_accuracy",
        "runtime_seconds",
    )
    return Summary(
        outcome=Outcome.SUCCEEDED,
        reason="Succeeded",
        adapter_uri=f"{run.output.uri.rstrip('/')}/adapter",
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
