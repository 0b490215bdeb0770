"""File readers: JSON lines, JSON arrays, CSV/TSV and Parquet, keeping line numbers.

Every reader returns a RawDataset; records it cannot parse become `malformed` issues with the
line they are on, and reading goes on with the next record wherever the format allows it.
A file that is no UTF-8 text at all (UTF-16/32, compressed, binary) or that is a JSON array
saved as JSON lines is one `encoding`/`layout` issue for the whole file, not one per line.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import IO

from finetune_trainer.data.records import Origin, RawDataset
from finetune_trainer.data.report import Issue
from finetune_trainer.sniff import HEAD_BYTES, describe

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


class _Prefixed(io.RawIOBase):
    """`head` (bytes already read from `rest`) followed by the rest of the stream."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _sniffed(handle: IO[bytes], name: str, out: RawDataset) -> IO[bytes] | None:
    """The stream to read as text, or None (with one issue in `out`) when it is no text."""
    head = handle.read(HEAD_BYTES)
    problem = describe(head)
    if problem is not None:
        out.errors.append(Issue("encoding", f"{name}: {problem}"))
        return None
    return io.BufferedReader(_Prefixed(head, handle))


def _is_json_array(line: str) -> bool:
    """Whether the first content line of a JSON lines file opens a JSON array of records."""
    text = line.strip()
    if not text.startswith("["):
        return False
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return True  # "[" alone, or the first line of an array spread over many
    return isinstance(value, list) and any(isinstance(item, dict) for item in value)


JSON_ARRAY = (
    "this is a JSON array, not JSON lines; name the file .json or write one object per line"
)


def _lines(stream: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    for number, raw in enumerate(stream, start=1):
        yield number, (raw[3:] if number == 1 and raw.startswith(b"\xef\xbb\xbf") else raw)


def read_jsonl(handle: IO[bytes], name: str) -> RawDataset:
    """One JSON value per line; blank lines skipped; bad lines collected as issues."""
    out = RawDataset(name)
    stream = _sniffed(handle, name, out)
    if stream is None:
        return out
    decoder = json.JSONDecoder()
    first = True
    for number, raw in _lines(stream):
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            out.errors.append(
                Issue("malformed", f"not valid UTF-8 at byte {exc.start}", Origin(name, number))
            )
            continue
        if not line.strip():
            continue
        if first and _is_json_array(line):
            out.errors.append(Issue("layout", f"{name}: {JSON_ARRAY}"))
            return out
        first = False
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
    problem = describe(data[:HEAD_BYTES])
    if problem is not None:
        out = RawDataset(name)
        out.errors.append(Issue("encoding", f"{name}: {problem}"))
        return out
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
    stream = _sniffed(handle, name, out)
    if stream is None:
        return out
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
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
    import pyarrow as pa  # type: ignore[import-untyped]
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    out = RawDataset(name)
    try:
        table = pq.read_table(handle)
    except pa.ArrowException as exc:
        head = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        out.errors.append(Issue("encoding", f"{name}: not a readable Parquet file ({head})"))
        return out
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
