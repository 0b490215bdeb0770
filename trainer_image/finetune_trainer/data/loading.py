"""Read a dataset source into a RawDataset: files, directories, fsspec URLs, hf://, inline."""

from __future__ import annotations

import lzma
import os
import zlib
from typing import TYPE_CHECKING, Any

from finetune_trainer import storage
from finetune_trainer.data.readers import COMPRESSION_SUFFIXES, READERS, file_kind, read_stream
from finetune_trainer.data.records import Origin, RawDataset
from finetune_trainer.data.report import DatasetError, ValidationReport, fail
from finetune_trainer.errors import TransientError, classify, first_line
from finetune_trainer.progress import ENV_HF_TOKEN

if TYPE_CHECKING:
    from finetune_trainer.config import DatasetSpec

HF_PREFIX = "hf://datasets/"


def load_records(spec: DatasetSpec) -> RawDataset:
    """Read the training records of `spec` (its `source`, or its `inline` records)."""
    if spec.inline is not None:
        out = RawDataset("dataset.inline")
        for index, record in enumerate(spec.inline):
            data = record.model_dump(exclude_none=True)
            out.append(data, Origin("dataset.inline", index, "inline"))
        return out
    assert spec.source is not None  # DatasetSpec guarantees source xor inline
    return load_source(spec.source)


def load_source(uri: str) -> RawDataset:
    """Read every record of `uri` (a file, a directory/prefix of files, or hf://datasets/...).

    Raises DatasetError when the source does not exist, cannot be read (permissions, no
    credentials) or holds no readable files; TransientError when it cannot be reached.
    """
    if uri.startswith("hf://"):
        return _load_hf(uri)
    report = ValidationReport(uri)
    try:
        files = storage.list_files(uri)
    except storage.StorageError as exc:
        raise fail(report, "source", str(exc)) from None
    if len(files) == 1 and files[0] in (uri, storage.resolve(uri)):
        return _load_file(uri, uri, report)
    supported = [f for f in files if file_kind(f)]
    if not supported:
        raise fail(
            report,
            "source",
            f"{uri} is a directory without data files (expected "
            + ", ".join(sorted(READERS))
            + ")",
        )
    out = RawDataset(uri)
    for path in supported:
        out.extend(_load_file(path, path, report))
    return out


def _load_file(uri: str, name: str, report: ValidationReport) -> RawDataset:
    kind = file_kind(uri)
    if kind is None:
        raise fail(
            report,
            "source",
            f"{uri}: unsupported file type; use one of " + ", ".join(sorted(READERS)),
        )
    try:
        with storage.open_binary(uri) as handle:
            return read_stream(kind, handle, name)
    except storage.StorageError as exc:
        raise fail(report, "source", str(exc)) from None
    except (EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
        if not _bad_compression(uri, exc):
            raise
        raise fail(report, "source", f"{uri}: cannot decompress ({first_line(exc)})") from None


def _bad_compression(uri: str, exc: Exception) -> bool:
    """Whether `exc` is a decompressor refusing the bytes of `uri` (gzip.BadGzipFile, a truncated
    or corrupt stream): a compressed file, and no OS error with an errno."""
    compressed = uri.lower().endswith(COMPRESSION_SUFFIXES)
    return compressed and not (isinstance(exc, OSError) and exc.errno is not None)


def parse_hf_uri(uri: str) -> tuple[str, str | None, str, str | None]:
    """``hf://datasets/org/name[/config]/split`` -> (repo_id, config, split, file path or None).

    A last part with a data-file suffix names a file in the repo, read through fsspec.
    """
    if not uri.startswith(HF_PREFIX):
        raise ValueError(
            f"{uri}: Hugging Face datasets are addressed as hf://datasets/ORG/NAME[/SPLIT]"
        )
    parts = [p for p in uri[len(HF_PREFIX) :].split("/") if p]
    if len(parts) < 2:
        raise ValueError(f"{uri}: expected hf://datasets/ORG/NAME[/SPLIT]")
    repo_id = "/".join(parts[:2])
    rest = parts[2:]
    if rest and file_kind(rest[-1]):
        return repo_id, None, "train", "/".join(rest)
    if len(rest) > 2:
        raise ValueError(f"{uri}: expected hf://datasets/ORG/NAME[/CONFIG]/SPLIT")
    if len(rest) == 2:
        return repo_id, rest[0], rest[1], None
    return repo_id, None, (rest[0] if rest else "train"), None


def hf_load_dataset(repo_id: str, config: str | None, split: str, token: str | None) -> Any:
    """The one call that reaches the Hugging Face Hub (tests replace it with a local load)."""
    import datasets

    return datasets.load_dataset(repo_id, config, split=split, token=token)


def _load_hf(uri: str) -> RawDataset:
    report = ValidationReport(uri)
    try:
        repo_id, config, split, path = parse_hf_uri(uri)
    except ValueError as exc:
        raise fail(report, "source", str(exc)) from None
    if path is not None:  # a single file inside the dataset repo: read it like any file
        return _load_file(uri, uri, report)
    token = os.environ.get(ENV_HF_TOKEN) or None
    storage.bound_hub_timeouts()
    try:
        dataset = hf_load_dataset(repo_id, config, split, token)
    except Exception as exc:
        found = classify(exc, uri)
        if isinstance(found, TransientError):
            raise found from exc
        if found is None and not isinstance(exc, ValueError):  # ValueError: unknown split/config
            raise
        raise fail(report, "source", str(found or f"{uri}: {first_line(exc)}")) from None
    return records_from_hf(dataset, uri)


def records_from_hf(dataset: Any, name: str) -> RawDataset:
    """Turn a `datasets.Dataset` into records; ClassLabel ids become label names."""
    out = RawDataset(name)
    class_labels: dict[str, list[str]] = {}
    for column, feature in dataset.features.items():
        names = getattr(feature, "names", None)
        if type(feature).__name__ == "ClassLabel" and names:
            class_labels[column] = list(names)
    if "label" in class_labels:
        out.label_names = class_labels["label"]
    for index, row in enumerate(dataset, start=1):
        for column, names in class_labels.items():
            value = row.get(column)
            if isinstance(value, int) and 0 <= value < len(names):
                row[column] = names[value]
        out.append(row, Origin(name, index, "row"))
    return out


__all__ = ["DatasetError", "RawDataset", "load_records", "load_source", "parse_hf_uri"]
