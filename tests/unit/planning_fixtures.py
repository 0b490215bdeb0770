"""Test helpers for planning: a Hugging Face Hub cache holding only the config.json of the
examples' hub models (as a plan leaves it), so planning hub models works offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

HUB_CONFIGS = Path(__file__).resolve().parent / "data" / "hub_configs.json"
COMMIT = "0" * 40


def hub_cache_with_configs(root: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, dict]:
    """Write each repo's config.json into a hub cache under `root`, point huggingface_hub at
    it, offline; return the configs by repo."""
    configs: dict[str, dict] = json.loads(HUB_CONFIGS.read_text())
    for repo, config in configs.items():
        base = root / f"models--{repo.replace('/', '--')}"
        snapshot = base / "snapshots" / COMMIT
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text(json.dumps(config))
        (base / "refs").mkdir()
        (base / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return configs
