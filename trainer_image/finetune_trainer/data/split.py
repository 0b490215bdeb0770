"""Seeded train/validation/test splits by ratio."""

from __future__ import annotations

import random

from finetune_trainer.data.report import DatasetError, ValidationReport


def split_sizes(n: int, ratio: float) -> int:
    """How many of `n` examples a held-out `ratio` takes (rounded to nearest)."""
    return int(n * ratio + 0.5)


def ratio_split(
    n: int,
    *,
    validation: float | None,
    test: float | None,
    seed: int,
    report: ValidationReport,
) -> tuple[list[int], list[int], list[int]]:
    """Indices (sorted) of train, validation and test for `n` usable examples.

    One seeded shuffle (random.Random(seed), stable across Python versions) assigns the first
    indices to test, the next to validation, the rest to train; splits are disjoint. A ratio
    that would give an empty split, or leave no training example, is a DatasetError.
    """
    n_test = split_sizes(n, test) if test else 0
    n_val = split_sizes(n, validation) if validation else 0
    problems = []
    for name, ratio, size in (("validation", validation, n_val), ("test", test, n_test)):
        if ratio and size == 0:
            need = int(0.5 / ratio) + 1
            problems.append(
                f"dataset.{name}.splitRatio: {ratio} of {n} usable examples is 0 examples; "
                f"use a larger ratio, at least {need} examples, or a {name} source"
            )
    if n - n_val - n_test < 1 and not problems:
        problems.append(
            f"dataset: {n} usable examples leave no training example after holding out "
            f"{n_val} for validation and {n_test} for test"
        )
    if problems:
        for problem in problems:
            report.add("split", problem)
        raise DatasetError(report)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    test_idx = sorted(order[:n_test])
    val_idx = sorted(order[n_test : n_test + n_val])
    train_idx = sorted(order[n_test + n_val :])
    return train_idx, val_idx, test_idx
