"""Locate, fetch and load the base model and its tokenizer."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_trainer import storage
from finetune_trainer.config import ModelSpec, RunConfig
from finetune_trainer.progress import ENV_HF_TOKEN

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class ModelLoadError(Exception):
    """The model could not be found or loaded (a user-fixable input problem)."""


@dataclass(frozen=True)
class LocalModel:
    """A model on local disk: a directory, optionally with a GGUF file inside it."""

    path: Path
    gguf_file: str | None = None

    @property
    def description(self) -> str:
        """Where the weights are, for logs and the model card."""
        return str(self.path / self.gguf_file) if self.gguf_file else str(self.path)


def _split_hf(uri: str) -> str:
    repo = uri.removeprefix("hf://").strip("/")
    if repo.count("/") < 1:
        raise ModelLoadError(f"model.source: {uri!r} is not hf://ORG/NAME")
    return repo


def fetch_model(spec: ModelSpec, cache_dir: Path) -> LocalModel:
    """Bring the model to local disk (hub snapshot, object-store download or a mounted path)."""
    source = spec.source
    if source.startswith("hf://"):
        from huggingface_hub import snapshot_download

        try:
            local = snapshot_download(
                _split_hf(source),
                revision=spec.revision,
                token=os.environ.get(ENV_HF_TOKEN) or None,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"],
            )
        except Exception as exc:  # the hub client raises many types; all are input problems
            raise ModelLoadError(f"model.source: cannot download {source}: {exc}") from exc
        path = Path(local)
    elif storage.is_local(source):
        path = Path(storage.resolve(source))
    else:
        path = storage.download(source, cache_dir / "model")
    if not path.exists():
        raise ModelLoadError(f"model.source: {source} does not exist (resolved to {path})")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(
                f"model.source: {source} is a file; give a model directory or a .gguf file"
            )
        return LocalModel(path.parent, path.name)
    if not (path / "config.json").exists():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return LocalModel(path, ggufs[0])
        raise ModelLoadError(
            f"model.source: {source} has no config.json"
            + (f" and several .gguf files ({', '.join(ggufs)}): name one" if ggufs else "")
        )
    return LocalModel(path)


def load_tokenizer(local: LocalModel, spec: ModelSpec) -> Any:
    """The tokenizer, with a pad token (falls back to eos) and right padding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        local.path, gguf_file=local.gguf_file, trust_remote_code=spec.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def torch_dtype(name: str) -> torch.dtype:
    """A torch dtype from its config name (bf16/fp16/fp32 or bfloat16/...)."""
    import torch

    return {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
    }[name]


def attention_implementation(spec: ModelSpec) -> str:
    """flash_attention_2 where installed on CUDA, else sdpa (or what the spec says)."""
    if spec.attention != "auto":
        return spec.attention
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _quantization_config(run: RunConfig, compute: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    q = run.method.quantization
    assert q is not None
    cdtype = compute if q.compute_dtype == "auto" else torch_dtype(q.compute_dtype)
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=cdtype,
    )


def _dequantize_gguf(model: Any, auto_class: Any, dtype: torch.dtype) -> Any:
    """A GGUF-loaded model is marked quantized and refuses training: rebuild it as plain."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = auto_class.from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise ModelLoadError(f"GGUF weights do not match the architecture: {missing[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain


def load_model(
    local: LocalModel,
    run: RunConfig,
    *,
    dtype: torch.dtype,
    label_names: list[str] | None = None,
) -> Any:
    """Load the base model for the run's task, k-bit quantized when the method asks for it."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    spec = run.model
    kwargs: dict[str, Any] = {
        "trust_remote_code": spec.trust_remote_code,
        "dtype": dtype,
        "attn_implementation": attention_implementation(spec),
    }
    if run.task == "sequence-classification":
        auto_class: Any = AutoModelForSequenceClassification
        assert label_names, "sequence-classification needs label names"
        kwargs["num_labels"] = len(label_names)
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {name: i for i, name in enumerate(label_names)}
    else:
        auto_class = AutoModelForCausalLM
    if run.method.quantization is not None:
        if local.gguf_file:
            raise ModelLoadError(
                "method.quantization: a .gguf model cannot be re-quantized with bitsandbytes; "
                "use the safetensors checkpoint"
            )
        kwargs["quantization_config"] = _quantization_config(run, dtype)
        kwargs["device_map"] = {"": 0}
    if local.gguf_file:
        kwargs["gguf_file"] = local.gguf_file
    log.info("loading %s (%s)", local.description, auto_class.__name__)
    try:
        model = auto_class.from_pretrained(local.path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model.source: cannot load {local.description}: {exc}") from exc
    if local.gguf_file:
        model = _dequantize_gguf(model, auto_class, dtype)
    if run.task == "sequence-classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model
