"""File readers: JSON lines, JSON arrays, CSV/TSV and Parquet, keeping line numbers.

Every reader returns a RawDataset; records it cannot parse become `malformed` issues with the
line they are on, and reading goes on with the next record wherever the format allows it.
"""

from __future__ import annotations

import csv
import io
import json
from typing import IO

from finetune_trainer.data.records import Origin, RawDataset
from finetune_trainer.data.report import Issue

COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zstd")
READERS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


def file_kind(name: str) -> str | None:
    """The reader for a file name (compression suffixes ignored), or None if unsupported."""
    lower = name.lower()
    for suffix in COMPRESSION_SUFFIXES:
        if lower.endswith(suffix):
            lower = lower[: -len(suffix)]
            break
    for suffix, kind in READERS.items():
        if lower.endswith(suffix):
            return kind
    return None


def _short(exc: json.JSONDecodeError) -> str:
    return f"invalid JSON: {exc.msg} (column {exc.colno})"


def read_jsonl(handle: IO[bytes], name: str) -> RawDataset:
    """One JSON value per line; blank lines skipped; bad lines collected as issues."""
    out = RawDataset(name)
    decoder = json.JSONDecoder()
    for number, raw in enumerate(handle, start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            out.errors.append(
                Issue("malformed", f"not valid UTF-8 at byte {exc.start}", Origin(name, number))
            )
            continue
        if not line.strip():
            continue
        try:
            out.append(decoder.decode(line), Origin(name, number))
        except json.JSONDecodeError as exc:
            out.errors.append(Issue("malformed", _short(exc), Origin(name, number)))
    return out


def read_json(handle: IO[bytes], name: str) -> RawDataset:
    """A JSON array of records (line numbers = where each element starts).

    A file that does not start with ``[`` is read as JSON lines (many ``.json`` files are).
    """
    data = handle.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        out = RawDataset(name)
        line = data[: exc.start].count(b"\n") + 1
        out.errors.append(Issue("malformed", "not valid UTF-8", Origin(name, line)))
        return out
    stripped = text.lstrip()
    if not stripped.startswith("["):
        return read_jsonl(io.BytesIO(data), name)
    return _read_json_array(text, name)


def _read_json_array(text: str, name: str) -> RawDataset:
    out = RawDataset(name)
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line = 1 + text.count("\n", 0, pos)
    last = pos
    n = len(text)

    def skip(p: int) -> int:
        while p < n and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip(pos)
    if pos < n and text[pos] == "]":
        return out
    while True:
        line += text.count("\n", last, pos)
        last = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            err_line = 1 + text.count("\n", 0, exc.pos)
            out.errors.append(
                Issue(
                    "malformed",
                    f"invalid JSON: {exc.msg}; the rest of the array cannot be read",
                    Origin(name, err_line),
                )
            )
            return out
        out.append(value, Origin(name, line))
        pos = skip(end)
        if pos < n and text[pos] == ",":
            pos = skip(pos + 1)
            continue
        if pos < n and text[pos] == "]":
            if skip(pos + 1) < n:
                err_line = 1 + text.count("\n", 0, pos + 1)
                out.errors.append(
                    Issue("malformed", "extra data after the JSON array", Origin(name, err_line))
                )
            return out
        err_line = 1 + text.count("\n", 0, pos)
        out.errors.append(
            Issue(
                "malformed",
                "invalid JSON: expected ',' or ']' after a record; the rest cannot be read",
                Origin(name, err_line),
            )
        )
        return out


def read_csv(handle: IO[bytes], name: str, delimiter: str = ",") -> RawDataset:
    """CSV/TSV with a header row; all values are strings, empty cells count as absent."""
    out = RawDataset(name)
    text = io.TextIOWrapper(handle, encoding="utf-8-sig", newline="")
    try:
        reader = csv.reader(text, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return out
        header = [h.strip() for h in header]
        start = reader.line_num + 1
        for row in reader:
            origin = Origin(name, start)
            start = reader.line_num + 1
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                out.errors.append(
                    Issue(
                        "malformed",
                        f"row has {len(row)} fields, the header has {len(header)}",
                        origin,
                    )
                )
                continue
            out.append({k: v for k, v in zip(header, row, strict=True) if v != ""}, origin)
    except UnicodeDecodeError as exc:
        out.errors.append(
            Issue("malformed", f"not valid UTF-8 ({exc.reason})", Origin(name, start))
        )
    except csv.Error as exc:
        out.errors.append(Issue("malformed", f"invalid CSV: {exc}", Origin(name, start)))
    finally:
        text.detach()
    return out


def read_parquet(handle: IO[bytes], name: str) -> RawDataset:
    """A Parquet file; origins are 1-based row numbers."""
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    table = pq.read_table(handle)
    out = RawDataset(name)
    for index, row in enumerate(table.to_pylist(), start=1):
        out.append(row, Origin(name, index, "row"))
    return out


def read_stream(kind: str, handle: IO[bytes], name: str) -> RawDataset:
    """Dispatch to the reader for `kind` (see READERS)."""
    if kind == "jsonl":
        return read_jsonl(handle, name)
    if kind == "json":
        return read_json(handle, name)
    if kind in ("csv", "tsv"):
        return read_csv(handle, name, "\t" if kind == "tsv" else ",")
    if kind == "parquet":
        return read_parquet(handle, name)
    raise ValueError(f"no reader for {kind!r}")
