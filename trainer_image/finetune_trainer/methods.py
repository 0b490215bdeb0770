"""Apply the fine-tuning method (full, LoRA, DoRA, QLoRA, prefix, prompt, IA3) to a model."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from finetune_trainer.config import ALL_LINEAR, RunConfig


class MethodError(Exception):
    """The method does not fit the model (e.g. a target module that does not exist)."""


@dataclass(frozen=True)
class ParamCount:
    """Trainable and total parameter counts."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        """Trainable share of all parameters, in percent."""
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} of {self.total:,} ({self.percent:.4f}%)"


def untuned(model: Any) -> AbstractContextManager[Any]:
    """A context in which `model` acts untuned: a PEFT model with its adapter disabled; any
    other model as it is."""
    if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
        return model.disable_adapter()  # type: ignore[no-any-return]
    return contextlib.nullcontext()


def count_parameters(model: Any) -> ParamCount:
    """Count trainable and total parameters (k-bit packed weights counted unpacked)."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if param.requires_grad:
            trainable += n
    return ParamCount(trainable, total)


def linear_module_names(model: Any) -> list[str]:
    """Short names of the model's linear layers (what targetModules may name), head excluded."""
    import torch

    names: set[str] = set()
    output_layer = (
        model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    )
    for name, module in model.named_modules():
        is_linear = isinstance(module, torch.nn.Linear) or "Linear" in type(module).__name__
        if is_linear and module is not output_layer and name:
            names.add(name.rsplit(".", 1)[-1])
    for head in ("lm_head", "score", "classifier"):
        names.discard(head)
    return sorted(names)


def _target_modules(model: Any, requested: list[str]) -> str | list[str]:
    if requested == [ALL_LINEAR]:
        return ALL_LINEAR
    available = set(linear_module_names(model))
    missing = [m for m in requested if m not in available]
    if missing:
        raise MethodError(
            f"method.lora.targetModules: {', '.join(missing)} not in this model; its linear "
            f"modules are: {', '.join(sorted(available))} (or use all-linear)"
        )
    return requested


def _peft_task_type(run: RunConfig) -> Any:
    from peft import TaskType

    return TaskType.SEQ_CLS if run.task == "sequence-classification" else TaskType.CAUSAL_LM


def build_peft_config(run: RunConfig, model: Any) -> Any:
    """The peft config for the run's method (None for a full fine-tune)."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    method = run.method
    task_type = _peft_task_type(run)
    if method.type == "full":
        return None
    if method.lora is not None:
        lora = method.lora
        return LoraConfig(
            task_type=task_type,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=_target_modules(model, lora.target_modules),
            use_dora=method.type == "dora",
            use_rslora=lora.use_rslora,
            bias="none",
        )
    if method.prefix is not None:
        return PrefixTuningConfig(
            task_type=task_type, num_virtual_tokens=method.prefix.num_virtual_tokens
        )
    if method.prompt is not None:
        prompt = method.prompt
        init: dict[str, Any] = {}
        if prompt.init_text:
            init = {
                "prompt_tuning_init": "TEXT",
                "prompt_tuning_init_text": prompt.init_text,
                "tokenizer_name_or_path": model.name_or_path,
            }
        return PromptTuningConfig(
            task_type=task_type, num_virtual_tokens=prompt.num_virtual_tokens, **init
        )
    if method.type == "ia3":
        return IA3Config(task_type=task_type)
    raise MethodError(f"method.type: {method.type} is not supported")  # pragma: no cover


def apply_method(run: RunConfig, model: Any, *, gradient_checkpointing: bool) -> Any:
    """Wrap `model` for the method: freeze what is not trained, add the adapter."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if run.method.quantization is not None:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    config = build_peft_config(run, model)
    if config is None:
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise MethodError(f"method: {exc}") from exc
    if gradient_checkpointing and run.method.quantization is None:
        peft_model.enable_input_require_grads()
    return peft_model
