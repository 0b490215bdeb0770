"""Locate, fetch and load the base model and its tokenizer."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_trainer import storage
from finetune_trainer.config import VIRTUAL_TOKEN_METHODS, ModelSpec, RunConfig
from finetune_trainer.distributed import Rank
from finetune_trainer.errors import InvalidInputError, TransientError, classify, first_line
from finetune_trainer.progress import ENV_HF_TOKEN

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class ModelLoadError(InvalidInputError):
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


def _hub_snapshot(spec: ModelSpec) -> Path:
    """Download (or find in the Hub cache) the model's files; errors classified: not found,
    gated or no access is the user's (ModelLoadError), an unreachable or failing Hub is
    transient (TransientError)."""
    from huggingface_hub import snapshot_download

    repo = _split_hf(spec.source)
    storage.bound_hub_timeouts()
    try:
        local = snapshot_download(
            repo,
            revision=spec.revision,
            token=os.environ.get(ENV_HF_TOKEN) or None,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"],
        )
    except Exception as exc:
        found = classify(exc, f"model.source: {spec.source}")
        if isinstance(found, TransientError):
            raise found from exc
        if found is not None:
            raise ModelLoadError(str(found)) from exc
        raise
    return Path(local)


def _downloaded(source: str, cache_dir: Path) -> Path:
    """A remote (s3://, gs://, ...) model directory or file, copied to `cache_dir`."""
    try:
        return storage.download(source, cache_dir / "model")
    except storage.StorageError as exc:
        raise ModelLoadError(f"model.source: {exc}") from exc
    except TransientError as exc:
        raise TransientError(f"model.source: {exc}") from exc


def fetch_model(spec: ModelSpec, cache_dir: Path) -> LocalModel:
    """Bring the model to local disk (hub snapshot, object-store download or a mounted path)."""
    source = spec.source
    if source.startswith("hf://"):
        path = _hub_snapshot(spec)
    elif storage.is_local(source):
        try:
            path = Path(storage.resolve(source))
        except storage.StorageError as exc:
            raise ModelLoadError(f"model.source: {exc}") from exc
    else:
        path = _downloaded(source, cache_dir)
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


#: Kernels that attend within each sequence of a padding-free or packed row without a
#: materialised (tokens x tokens) mask: memory linear in tokens.
VARLEN_ATTENTION = ("flash_attention_2", "flex_attention")


def attention_implementation(run: RunConfig, device: str) -> str | None:
    """The `attn_implementation` to load the model with; None leaves it to transformers (sdpa,
    or eager for models without sdpa). auto, in order: flash_attention_2 when flash-attn is
    installed on CUDA; flex_attention on CUDA when torch has FlexAttention (not for prefix or
    prompt tuning, whose virtual tokens reach attention as a key/value cache); else None.
    Raises ModelLoadError for a kernel this machine cannot train with."""
    import importlib.util

    wanted = run.model.attention
    if wanted == "flash_attention_2" and (
        device != "cuda" or importlib.util.find_spec("flash_attn") is None
    ):
        raise ModelLoadError(
            "model.attention: flash_attention_2 needs a CUDA GPU and the flash-attn package; "
            "use auto (flex_attention or sdpa)"
        )
    if wanted == "flex_attention" and device != "cuda":
        raise ModelLoadError(
            "model.attention: flex_attention trains on CUDA only (PyTorch has no FlexAttention "
            "backward on CPU); use auto or sdpa"
        )
    if wanted != "auto":
        return wanted
    if device != "cuda":
        return None
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    from transformers.utils import is_torch_flex_attn_available

    if is_torch_flex_attn_available() and run.method.type not in VIRTUAL_TOKEN_METHODS:
        return "flex_attention"
    return None


def _quantization_config(run: RunConfig, compute: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    q = run.method.quantization
    assert q is not None
    cdtype = compute if q.compute_dtype == "auto" else torch_dtype(q.compute_dtype)
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    sharded = run.training.distributed.strategy == "fsdp"
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=cdtype,
        # FSDP shards the packed 4-bit weights as tensors of the compute dtype (QLoRA + FSDP)
        **({"bnb_4bit_quant_storage": cdtype} if sharded else {}),
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
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    spec = run.model
    attention = attention_implementation(run, "cuda" if torch.cuda.is_available() else "cpu")
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code, "dtype": dtype}
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
        problem = kbit_device_error(run)
        if problem:
            raise ModelLoadError(problem)
        kwargs["quantization_config"] = _quantization_config(run, dtype)
        if run.training.distributed.strategy != "fsdp":  # FSDP places the shards itself
            kwargs["device_map"] = {"": Rank.from_env().local_rank}  # one GPU per worker
    if local.gguf_file:
        kwargs["gguf_file"] = local.gguf_file
    log.info("loading %s (%s, attention %s)", local.description, auto_class.__name__, attention)
    try:
        with _library_load_report_hidden():
            model, info = _from_pretrained(auto_class, local.path, attention, spec, kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"model.source: cannot load {local.description}: {first_line(exc)}"
        ) from exc
    if local.gguf_file:
        model = _dequantize_gguf(model, auto_class, dtype)
    else:  # a GGUF checkpoint's missing weights are checked when it is dequantized
        _report_loading(model, info, label_names if run.task == "sequence-classification" else None)
    if run.task == "sequence-classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def _from_pretrained(
    auto_class: Any, path: Path, attention: str | None, spec: ModelSpec, kwargs: dict[str, Any]
) -> tuple[Any, dict[str, Any]]:
    """from_pretrained with `attention`; a kernel that auto chose and the architecture does
    not support falls back to the model's default (transformers' ValueError names it)."""
    try:
        return auto_class.from_pretrained(  # type: ignore[no-any-return]
            path, output_loading_info=True, attn_implementation=attention, **kwargs
        )
    except ValueError as exc:
        if spec.attention != "auto" or attention is None or attention not in str(exc):
            raise
        log.info("%s: not supported by this architecture; using its default attention", attention)
        return auto_class.from_pretrained(  # type: ignore[no-any-return]
            path, output_loading_info=True, **kwargs
        )


def kbit_device_error(run: RunConfig) -> str | None:
    """Why this machine cannot load the run's base model in k bits (bitsandbytes needs a CUDA
    GPU); None when it can or the method does not quantize."""
    if run.method.quantization is None:
        return None
    import torch

    if torch.cuda.is_available():
        return None
    field = "type" if run.method.type == "qlora" else "quantization"
    return (
        f"method.{field}: {run.method.type} loads the base model in "
        f"{run.method.quantization.bits} bits, "
        "which needs a CUDA GPU and this machine has none; run it on a GPU (on a cluster: "
        "resources.gpus: 1) or use method lora here"
    )


#: Loggers whose load-time reports read like errors to a first-time user (the LOAD REPORT table
#: of missing/unexpected weights, the tensor-parallel plan check); `_report_loading` says what
#: matters instead.
LOAD_REPORT_LOGGERS = ("transformers.modeling_utils", "transformers.distributed.tensor_parallel")


@contextmanager
def _library_load_report_hidden() -> Iterator[None]:
    """Keep the library's load reports out of the output unless debugging."""
    loggers = [logging.getLogger(name) for name in LOAD_REPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    if not log.isEnabledFor(logging.DEBUG):
        for logger in loggers:
            logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _report_loading(model: Any, info: dict[str, Any], label_names: list[str] | None) -> None:
    """Say which weights were not in the checkpoint: for a classifier, its new head."""
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    missing = sorted(info.get("missing_keys") or ())
    head = sorted({key.rsplit(".", 1)[0] for key in missing if not key.startswith(prefix)})
    if label_names is not None and head:
        log.info(
            "a new classification head (%s) is initialised for the %d labels %s; it is trained "
            "with the method's adapter, the rest of the model comes from the checkpoint",
            ", ".join(head),
            len(label_names),
            ", ".join(label_names[:20]),
        )
        missing = [key for key in missing if key.startswith(prefix)]
    if missing:
        log.warning(
            "%d weights are not in the checkpoint and start random: %s",
            len(missing),
            ", ".join(missing[:8]),
        )
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        log.debug("checkpoint weights the model does not use: %s", unexpected[:8])
