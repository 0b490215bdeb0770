"""Classification labels: the label set, name -> id, and checks on it."""

from __future__ import annotations

from collections import Counter
from typing import Any

from finetune_trainer.data.records import Origin
from finetune_trainer.data.report import ValidationReport

IMBALANCE_WARNING = 0.05  # warn when a class has less than 5% of the largest class's examples


def _sort_key(value: Any) -> tuple[int, int, str]:
    return (0, value, "") if isinstance(value, int) else (1, 0, str(value))


def label_set(
    found: list[Any], declared: list[str] | None, source_names: list[str] | None
) -> tuple[list[str], str]:
    """The label names in id order and where they come from.

    `declared` (dataset.labels) wins, then names the source declares (a ClassLabel column),
    else the labels found, sorted (integers numerically, then strings).
    """
    if declared:
        return list(declared), "dataset.labels"
    if source_names:
        return list(source_names), "the dataset's ClassLabel feature"
    distinct = sorted(set(found), key=_sort_key)
    return [str(v) for v in distinct], "sorted labels found in the training data"


class LabelMapper:
    """Maps raw labels to ids; integers may also be ids into a declared label list."""

    def __init__(self, names: list[str], ints_are_ids: bool) -> None:
        self.names = names
        self.index = {name: i for i, name in enumerate(names)}
        self.ints_are_ids = ints_are_ids

    def __call__(self, value: Any) -> int | None:
        key = str(value)
        if key in self.index:
            return self.index[key]
        if self.ints_are_ids and isinstance(value, int) and 0 <= value < len(self.names):
            return value
        return None


def map_labels(
    labels: list[Any],
    origins: list[Origin],
    mapper: LabelMapper,
    report: ValidationReport,
    where: str,
) -> list[int | None]:
    """Ids for `labels`; unknown labels become `unknown_label` errors (None in the result)."""
    out: list[int | None] = []
    shown = ", ".join(mapper.names[:20]) + (" ..." if len(mapper.names) > 20 else "")
    for value, origin in zip(labels, origins, strict=True):
        label_id = mapper(value)
        if label_id is None:
            report.add(
                "unknown_label",
                f"label {value!r} is not in the label set of {where} ({shown})",
                origin,
            )
        out.append(label_id)
    return out


def check_label_balance(
    ids: list[int], names: list[str], report: ValidationReport, split: str
) -> dict[str, int]:
    """Counts per label name; a hard error for fewer than 2 classes, warnings for imbalance."""
    counts = Counter(ids)
    named = {names[i]: counts.get(i, 0) for i in range(len(names))}
    present = [n for n, c in named.items() if c]
    if split == "train":
        if len(present) < 2:
            only = f"only {present[0]!r}" if present else "none"
            report.add(
                "label_set",
                f"sequence classification needs at least 2 labels in the training data; "
                f"found {only}",
            )
        missing = [n for n, c in named.items() if not c]
        if missing and present:
            report.warn(f"labels without training examples: {', '.join(missing[:20])}")
        if present:
            largest = max(named.values())
            for name, count in named.items():
                if 0 < count < IMBALANCE_WARNING * largest:
                    report.warn(
                        f"label {name!r} has {count} training examples, the largest class "
                        f"{largest}: consider balancing"
                    )
    return named
