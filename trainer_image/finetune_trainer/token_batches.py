"""Batches sized by tokens (`training.batchTokens`): examples grouped so each device batch
holds at most a token budget, for padding-free and packed causal-LM batches.

The groups are formed once from a seeded shuffle (so their number, the epoch length, is
fixed), and each epoch visits them in an order drawn from the seed and the epoch: a resumed
run skips exactly the batches it already trained. Under several workers accelerate hands
each worker whole batches in turn.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any


class _Epoch:
    """The epoch a sampler is in, set by accelerate's `set_epoch` (which looks for it at
    `batch_sampler.sampler`, also when the batch sampler is wrapped for several workers)."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def token_groups(lengths: Sequence[int], budget: int, seed: int) -> list[list[int]]:
    """Indices of `lengths` in groups of at most `budget` tokens (an example longer than the
    budget goes alone), in a seeded random order."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    groups: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for index in order:
        n = lengths[index]
        if current and tokens + n > budget:
            groups.append(current)
            current, tokens = [], 0
        current.append(index)
        tokens += n
    if current:
        groups.append(current)
    return groups


class TokenBudgetBatchSampler:
    """A batch sampler yielding `token_groups`, in a new seeded order each epoch."""

    def __init__(self, lengths: Sequence[int], budget: int, seed: int) -> None:
        self.groups = token_groups(lengths, budget, seed)
        self.seed = seed
        self.sampler = _Epoch()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration follows."""
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(range(len(self.groups)))
        random.Random(self.seed * 1_000_003 + self.sampler.epoch).shuffle(order)
        for i in order:
            yield self.groups[i]


def example_lengths(dataset: Any) -> list[int]:
    """Tokens of each example (row) of a tokenized dataset."""
    import pyarrow.compute as pc  # type: ignore[import-untyped]

    column = dataset.with_format("arrow")[:].column("input_ids")
    return [int(n) for n in pc.list_value_length(column).to_pylist()]


def mean_rows(dataset: Any, budget: int) -> int:
    """About how many examples of `dataset` a batch of `budget` tokens holds (for the logs
    and the evaluation batch size)."""
    lengths = example_lengths(dataset)
    mean = sum(lengths) / max(len(lengths), 1)
    return max(1, min(len(lengths), int(budget // max(mean, 1.0))))


class TokenBatchesMixin:
    """A Trainer whose training batches are `TokenBudgetBatchSampler` groups of
    `batch_tokens` tokens (set on the instance) instead of rows of the batch size."""

    batch_tokens: int

    def get_train_dataloader(self) -> Any:
        """The training DataLoader over token-budget batches, prepared by accelerate."""
        from torch.utils.data import DataLoader
        from transformers.trainer_utils import seed_worker

        trainer: Any = self
        dataset = trainer._remove_unused_columns(trainer.train_dataset, description="Training")
        args = trainer.args
        sampler = TokenBudgetBatchSampler(example_lengths(dataset), self.batch_tokens, args.seed)
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=trainer.data_collator,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            worker_init_fn=partial(
                seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index
            ),
        )
        return trainer.accelerator.prepare(loader)


def with_token_batches(trainer_class: type[Any]) -> type[Any]:
    """`trainer_class` with training batches sized by tokens (see TokenBatchesMixin)."""
    return type(f"TokenBatches{trainer_class.__name__}", (TokenBatchesMixin, trainer_class), {})
