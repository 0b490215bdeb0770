"""Raw records as read from a source, each with where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Unit = Literal["line", "record", "row", "inline"]


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a record came from: a file and a 1-based line (or record/row) number.

    ``unit`` says what ``line`` counts: ``line`` (JSONL, CSV, JSON arrays: the line the record
    starts on), ``row`` (Parquet, Hugging Face datasets: 1-based row), ``inline`` (0-based index
    into ``dataset.inline``, like a field path).
    """

    file: str
    line: int
    unit: Unit = "line"

    def __str__(self) -> str:
        if self.unit == "inline":
            return f"{self.file}[{self.line}]"
        if self.unit == "row":
            return f"{self.file} row {self.line}"
        if self.unit == "record":
            return f"{self.file} record {self.line}"
        return f"{self.file}:{self.line}"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "unit": self.unit}


@dataclass
class RawDataset:
    """Records read from one source, in order, with their origins.

    ``errors`` holds records that could not be read at all (malformed JSON, bad CSV rows, invalid
    UTF-8) as :class:`~finetune_trainer.data.report.Issue` objects: they are collected, never
    raised one at a time. ``label_names`` is set when the source declares a label set
    (a Hugging Face ``ClassLabel`` column).
    """

    source: str
    records: list[Any] = field(default_factory=list)
    origins: list[Origin] = field(default_factory=list)
    errors: list[Any] = field(default_factory=list)
    label_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def append(self, record: Any, origin: Origin) -> None:
        self.records.append(record)
        self.origins.append(origin)

    def extend(self, other: RawDataset) -> None:
        self.records.extend(other.records)
        self.origins.extend(other.origins)
        self.errors.extend(other.errors)
        if other.label_names and not self.label_names:
            self.label_names = other.label_names
