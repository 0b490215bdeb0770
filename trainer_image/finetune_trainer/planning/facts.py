"""The model facts a plan needs (shape and exact parameter counts), from the config alone."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from finetune_trainer.config import RunConfig
from finetune_trainer.planning.plan import ModelFacts, variant
from finetune_trainer.planning.shape import count_params, shape_from_config

# the methods the advice compares
ADVISED_METHODS = ("full", "lora", "qlora")


def model_facts(config: Any, run: RunConfig, num_labels: int = 2) -> ModelFacts:
    """Shape and parameter counts of `run`'s method on the model of `config`."""
    name = str(getattr(config, "_name_or_path", "") or getattr(config, "model_type", "model"))
    return ModelFacts(shape_from_config(config, name), count_params(config, run, num_labels))


def method_facts(
    config: Any, run: RunConfig, methods: Iterable[str] = ADVISED_METHODS, num_labels: int = 2
) -> dict[str, ModelFacts]:
    """Facts of `run`'s own method and of each advised method's variant of it."""
    own = model_facts(config, run, num_labels)
    out: dict[str, ModelFacts] = {run.method.type: own}
    for method in methods:
        if method in out:
            continue
        if method == "qlora" and "lora" in out:
            out[method] = out["lora"]  # the same adapter on the same (k-bit) base
        else:
            out[method] = model_facts(config, variant(run, method), num_labels)
    return out
