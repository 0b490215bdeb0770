"""Read a FineTuneJob manifest or a bare run config from YAML/JSON, with `--set` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from finetune_trainer.config import ConfigError, RunConfig, parse_run_config, run_field_names


def _set_path(doc: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = doc
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError([f"{dotted}: {key} is not a mapping"])
        node = child
    node[keys[-1]] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    """`key.path=value` pairs; values parse as YAML (numbers, booleans, lists)."""
    out = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError([f"--set {pair!r}: expected key.path=value"])
        out.append((key.strip(), yaml.safe_load(raw) if raw else ""))
    return out


def load_run(path: Path, overrides: list[str] | None = None) -> tuple[str, RunConfig, list[str]]:
    """Load `path` as (name, run config, ignored cluster-only fields).

    A FineTuneJob manifest contributes its spec's run fields (model, dataset, task, method,
    training, output); its placement fields (resources, secrets, ...) only matter on a cluster
    and are returned as ignored. `overrides` are `key.path=value` paths into the run config
    (without the `spec.` prefix, which is accepted too).
    """
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError([f"{path}: {exc}"]) from None
    if not isinstance(doc, dict):
        raise ConfigError([f"{path}: expected a mapping at the top level"])
    prefix = ""
    name = path.stem
    if doc.get("kind") == "FineTuneJob":
        name = str((doc.get("metadata") or {}).get("name") or name)
        doc = doc.get("spec") or {}
        prefix = "spec"
    fields = run_field_names()
    ignored = sorted(k for k in doc if k not in fields) if prefix else []
    run_doc = {k: v for k, v in doc.items() if k in fields} if prefix else dict(doc)
    for key, value in parse_overrides(overrides or []):
        _set_path(run_doc, key.removeprefix("spec."), value)
    return name, parse_run_config(run_doc, prefix), ignored
