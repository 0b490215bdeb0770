"""The dataset pipeline of a run: sources, formats, validation, templates, tokenization, splits.

Importing this package imports neither torch nor datasets nor transformers; the functions that
need them import them. Entry points:

- :func:`prepare_dataset` -> :class:`PreparedDataset` (tokenized train/eval/test + report, stats)
- :func:`load_records` -> :class:`RawDataset` (records with file and line of origin)
- :class:`DatasetError`: a hard problem; ``str(err)`` says what to fix, ``err.report`` has it all.

See docs/data.md.
"""

from finetune_trainer.data.loading import load_records, load_source
from finetune_trainer.data.prepare import PreparedDataset, prepare_dataset
from finetune_trainer.data.records import Origin, RawDataset
from finetune_trainer.data.report import DatasetError, Issue, IssueGroup, ValidationReport
from finetune_trainer.data.stats import SplitStats, TokenStats
from finetune_trainer.data.templates import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, CHATML_JINJA

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "CHATML_JINJA",
    "DatasetError",
    "Issue",
    "IssueGroup",
    "Origin",
    "PreparedDataset",
    "RawDataset",
    "SplitStats",
    "TokenStats",
    "ValidationReport",
    "load_records",
    "load_source",
    "prepare_dataset",
]
