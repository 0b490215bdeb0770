"""The dimensions of a model, from its config alone (no weights), and its exact parameter
counts from an empty-weights (meta device) instantiation through transformers and peft."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a transformer (decoder-only Llama family, or an encoder)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: int | None = None
    rope_theta: float = 10000.0

    @property
    def dim_head(self) -> int:
        """Width of one attention head."""
        return self.head_dim or self.hidden // self.heads

    def linear_params(self) -> int:
        """Parameters of every matmul a token passes through: attention, MLP and the LM head
        (the embedding lookup is not a matmul; a tied head still costs its matmul)."""
        d, hd = self.hidden, self.dim_head
        attn = d * self.heads * hd * 2 + d * self.kv_heads * hd * 2  # q, o ; k, v
        mlp = 3 * d * self.intermediate  # gate, up, down
        return self.layers * (attn + mlp) + d * self.vocab

    def total_params(self) -> int:
        """All parameters (embeddings, norms, head unless tied)."""
        norms = (2 * self.layers + 1) * self.hidden
        embed = self.vocab * self.hidden
        head = 0 if self.tied else self.vocab * self.hidden
        return self.linear_params() - self.hidden * self.vocab + embed + head + norms

    def lora_params(self, r: int, modules: Sequence[str]) -> int:
        """Trainable LoRA parameters for rank r on the named projections of every layer."""
        d, hd = self.hidden, self.dim_head
        shapes = {
            "q_proj": (d, self.heads * hd),
            "k_proj": (d, self.kv_heads * hd),
            "v_proj": (d, self.kv_heads * hd),
            "o_proj": (self.heads * hd, d),
            "gate_proj": (d, self.intermediate),
            "up_proj": (d, self.intermediate),
            "down_proj": (self.intermediate, d),
        }
        return self.layers * sum(r * (shapes[m][0] + shapes[m][1]) for m in modules)


def _first(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def shape_from_config(config: Any, name: str = "model") -> ModelShape:
    """The shape of a transformers config (its text part for a multimodal one)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(_first(text, "hidden_size", "n_embd", "d_model", "dim"))
    heads = int(_first(text, "num_attention_heads", "n_head", "n_heads", "encoder_attention_heads"))
    intermediate = _first(text, "intermediate_size", "n_inner", "ffn_dim", "hidden_dim")
    return ModelShape(
        name=name,
        hidden=hidden,
        intermediate=int(intermediate or 4 * hidden),
        layers=int(_first(text, "num_hidden_layers", "n_layer", "n_layers", "num_layers")),
        heads=heads,
        kv_heads=int(_first(text, "num_key_value_heads", "num_kv_heads", default=heads)),
        vocab=int(_first(text, "vocab_size", default=0)),
        tied=bool(_first(text, "tie_word_embeddings", default=True)),
        head_dim=_first(text, "head_dim"),
        rope_theta=float(_first(text, "rope_theta", default=10000.0)),
    )


@dataclass(frozen=True)
class ParamCounts:
    """Exact parameter counts of the model the run trains (from a meta-device build).

    `quantizable`: weights of the linear layers a k-bit load packs (every linear layer but
    the output head); `trainable`: what the method trains (all of them for a full fine-tune).
    """

    total: int
    trainable: int
    quantizable: int
    largest_linear: int

    @property
    def frozen(self) -> int:
        """Parameters the method does not train."""
        return self.total - self.trainable


def _counting_run(run: Any) -> Any:
    """The run as far as counting matters: no k-bit preparation (the meta device holds no
    packed weights; they are counted unpacked) and prompt tuning initialised at random (a text
    initialisation needs the tokenizer and does not change the count)."""
    update: dict[str, Any] = {"quantization": None}
    prompt = run.method.prompt
    if prompt is not None and prompt.init_text:
        update["prompt"] = prompt.model_copy(update={"init_text": None})
    return run.model_copy(update={"method": run.method.model_copy(update=update)})


def _tie(model: Any, config: Any) -> Any:
    """Tie the output head to the input embedding where the config says so (weights built on
    the meta device are left untied; a tied head counts once). Returns the head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if head is not None and getattr(text, "tie_word_embeddings", False):
        head.weight = model.get_input_embeddings().weight
    return head


def count_params(config: Any, run: Any, num_labels: int = 2) -> ParamCounts:
    """Build the run's model (base + method) on the meta device and count its parameters:
    no weights are read or allocated."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from finetune_trainer.errors import InvalidInputError
    from finetune_trainer.methods import MethodError, apply_method

    with init_empty_weights():
        if run.task == "sequence-classification":
            config.num_labels = num_labels
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    head = _tie(model, config)  # outside the context, which would copy the tied weight
    linears = [
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    ]
    try:
        with init_empty_weights():
            model = apply_method(_counting_run(run), model, gradient_checkpointing=False)
    except MethodError as exc:  # e.g. a target module the model does not have
        raise InvalidInputError(str(exc)) from exc
    _tie(model.get_base_model() if hasattr(model, "get_base_model") else model, config)
    total = trainable = 0
    for param in model.parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return ParamCounts(
        total=total,
        trainable=trainable,
        quantizable=sum(linears),
        largest_linear=max(linears, default=0),
    )
