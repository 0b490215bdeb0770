"""Read a FineTuneJob manifest or a bare run config from YAML/JSON, with `--set` overrides.

A manifest is checked as the cluster would admit it: `metadata.name` by the API server's rules,
and, through the ``finetune.admission`` entry-point group, every check the operator applies
(its spec model, the CRD's rules and the platform policy). The operator package provides that
check; this package never imports it. A bare run config (no ``kind``) is a `RunConfig`.

Every problem with the file itself (unreadable, not UTF-8, not YAML, too large or too deeply
nested) is a `ConfigError` naming the file, like a problem with a field.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import yaml

from finetune_trainer.config import (
    ConfigError,
    RunConfig,
    object_name_error,
    parse_run_config,
    run_field_names,
)
from finetune_trainer.errors import first_line
from finetune_trainer.sniff import HEAD_BYTES, describe, not_utf8

log = logging.getLogger(__name__)

KIND = "FineTuneJob"
ADMISSION_GROUP = "finetune.admission"
#: The API server refuses larger requests; a spec has no business being bigger.
MAX_SPEC_BYTES = 3 * 1024 * 1024
#: Deeper than any spec field goes, far below what would exhaust the parser's recursion.
MAX_DEPTH = 64
#: Name of a bare run config whose file name is no usable run name.
DEFAULT_NAME = "finetune"

Admission = Callable[[dict[str, Any]], list[str]]


def _depth(node: Any) -> int:
    """How deeply `node` nests mappings and lists (shared YAML aliases counted once)."""
    deepest, seen = 0, set()
    stack = [(node, 1)]
    while stack:
        item, level = stack.pop()
        if not isinstance(item, dict | list) or id(item) in seen:
            continue
        seen.add(id(item))
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            break
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, level + 1) for child in children)
    return deepest


def read_document(path: Path) -> dict[str, Any]:
    """The single YAML/JSON mapping in `path`, or ConfigError saying what is wrong with the file."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise ConfigError(
            [f"{path}: larger than {MAX_SPEC_BYTES // 2**20} MiB; a spec points at its data"]
        )
    problem = describe(raw[:HEAD_BYTES])  # UTF-16 ASCII decodes as UTF-8, NULs and all
    if problem is not None:
        raise ConfigError([f"{path}: {problem}"])
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: {not_utf8(raw, exc)}"]) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(
            [f"{where}: invalid YAML: {exc.problem or exc.context or first_line(exc)}"]
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: invalid YAML: {first_line(exc)}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: nested too deeply (at most {MAX_DEPTH} levels)"]) from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise ConfigError([f"{path}: {exc}"]) from None
    if not isinstance(doc, dict):
        raise ConfigError([f"{path}: expected a mapping (FineTuneJob or run config) at the top"])
    if _depth(doc) > MAX_DEPTH:
        raise ConfigError([f"{path}: nested too deeply (at most {MAX_DEPTH} levels)"])
    return doc


def _set_path(doc: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = doc
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError([f"--set {dotted}: {key} is not a mapping"])
        node = child
    node[keys[-1]] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    """`key.path=value` pairs; values parse as YAML (numbers, booleans, lists)."""
    out = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError([f"--set {pair!r}: expected key.path=value"])
        try:
            value = yaml.safe_load(raw) if raw else ""
        except (yaml.YAMLError, ValueError, RecursionError):
            raise ConfigError([f"--set {key}: {raw!r} is not a YAML value"]) from None
        out.append((key.strip(), value))
    return out


def admission_checks() -> list[Admission]:
    """The manifest admission checks that installed packages provide (the operator's)."""
    checks = []
    for ep in entry_points(group=ADMISSION_GROUP):
        try:
            checks.append(ep.load())
        except ImportError as exc:
            log.debug("admission check %s unavailable: %s", ep.name, exc)
    return checks


def manifest_errors(doc: dict[str, Any]) -> list[str]:
    """Why the cluster would refuse the FineTuneJob manifest `doc` (empty: it admits it)."""
    metadata = doc.get("metadata")
    problem = object_name_error(metadata.get("name") if isinstance(metadata, dict) else None)
    errors = [f"metadata.name: {problem}"] if problem else []
    for check in admission_checks():
        errors += [line for line in check(doc) if line not in errors]
    return errors


def run_name(path: Path) -> str:
    """A bare run config's name: its file name as a lowercase DNS label (usable as a path)."""
    name = re.sub(r"[^a-z0-9]+", "-", path.stem.lower()).strip("-")[:63].strip("-")
    return name or DEFAULT_NAME


def load_run(path: Path, overrides: list[str] | None = None) -> tuple[str, RunConfig, list[str]]:
    """Load `path` as (name, run config, placement fields not used locally).

    A FineTuneJob manifest must pass the cluster's admission as written; its run fields
    (model, dataset, task, method, training, evaluation, output) make the run config, its
    placement fields (resources, secrets, ...) only matter on a cluster. `overrides` are
    `key.path=value` paths into the run config (the `spec.` prefix is accepted too), checked
    by the run config's rules.
    """
    doc = read_document(path)
    prefix, name, placement = "", run_name(path), []
    if "kind" in doc or "apiVersion" in doc:
        if doc.get("kind") != KIND:
            raise ConfigError([f"kind: expected {KIND}, not {doc.get('kind')!r}"])
        errors = manifest_errors(doc)
        if errors:
            raise ConfigError(errors)
        name = doc["metadata"]["name"]
        spec = doc.get("spec")
        if not isinstance(spec, dict):
            raise ConfigError(["spec: expected a mapping"])
        doc, prefix = spec, "spec"
    fields = run_field_names()
    run_doc = {k: v for k, v in doc.items() if k in fields} if prefix else dict(doc)
    placement = sorted(k for k in doc if k not in fields) if prefix else []
    for key, value in parse_overrides(overrides or []):
        _set_path(run_doc, key.removeprefix("spec."), value)
    return name, parse_run_config(run_doc, prefix), placement
