"""The model's config without its weights: `config.json` from a local/pvc/pkg directory or an
object store, only `config.json` from the Hugging Face Hub, the header of a `.gguf` file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from finetune_trainer import storage
from finetune_trainer.config import ModelSpec
from finetune_trainer.errors import TransientError, classify, first_line
from finetune_trainer.models import LocalModel, ModelLoadError, fetch_model
from finetune_trainer.output_files import join
from finetune_trainer.progress import ENV_HF_TOKEN


def _hub_config(spec: ModelSpec) -> LocalModel:
    """Only config.json of a hub model (from the cache when present)."""
    from huggingface_hub import hf_hub_download

    repo = spec.source.removeprefix("hf://").strip("/")
    storage.bound_hub_timeouts()
    try:
        path = hf_hub_download(
            repo,
            "config.json",
            revision=spec.revision,
            token=os.environ.get(ENV_HF_TOKEN) or None,
        )
    except Exception as exc:
        found = classify(exc, f"model.source: {spec.source} (config.json)")
        if isinstance(found, TransientError):
            raise found from exc
        if found is not None:
            raise ModelLoadError(str(found)) from exc
        raise
    return LocalModel(Path(path).parent)


def _remote_config(spec: ModelSpec, cache_dir: Path) -> LocalModel:
    """Only config.json of a model directory in an object store."""
    try:
        path = storage.download(join(spec.source, "config.json"), cache_dir / "config")
    except storage.StorageError as exc:
        raise ModelLoadError(
            f"model.source: {exc}; planning reads the model's config.json (a .gguf in an "
            "object store cannot be planned without downloading it)"
        ) from exc
    return LocalModel(path.parent)


def locate_config(spec: ModelSpec, cache_dir: Path) -> LocalModel:
    """Where the model's config can be read, fetching nothing but config.json."""
    if spec.source.startswith("hf://"):
        return _hub_config(spec)
    if storage.is_local(spec.source):
        return fetch_model(spec, cache_dir)  # a local path is used in place, never copied
    return _remote_config(spec, cache_dir)


def load_config(spec: ModelSpec, cache_dir: Path) -> Any:
    """The transformers config of the run's model (a GGUF file: from its header only)."""
    return read_config(locate_config(spec, cache_dir), spec)


def read_config(local: LocalModel, spec: ModelSpec) -> Any:
    """The transformers config of a model on local disk (a GGUF file: its header only)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            local.path, gguf_file=local.gguf_file, trust_remote_code=spec.trust_remote_code
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"model.source: cannot read the config of {local.description}: {first_line(exc)}"
        ) from exc
