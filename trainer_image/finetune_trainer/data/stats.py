"""Token statistics of a prepared dataset."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SplitStats:
    """Size of one split in examples and tokens."""

    examples: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    mean_length: float = 0.0
    max_length: int = 0

    @classmethod
    def of(cls, lengths: list[int], loss_tokens: list[int]) -> SplitStats:
        n = len(lengths)
        total = sum(lengths)
        return cls(
            examples=n,
            tokens=total,
            loss_tokens=sum(loss_tokens),
            mean_length=round(total / n, 1) if n else 0.0,
            max_length=max(lengths, default=0),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "tokens": self.tokens,
            "lossTokens": self.loss_tokens,
            "meanLength": self.mean_length,
            "maxLength": self.max_length,
        }


@dataclass
class TokenStats:
    """Examples and tokens per split, and what validation removed or shortened."""

    splits: dict[str, SplitStats] = field(default_factory=dict)
    max_seq_length: int = 0
    truncated: int = 0
    dropped_duplicates: int = 0
    dropped_overlong: int = 0
    dropped_no_loss: int = 0
    label_counts: dict[str, dict[str, int]] | None = None

    @property
    def train(self) -> SplitStats:
        return self.splits.get("train", SplitStats())

    @property
    def dropped(self) -> int:
        return self.dropped_duplicates + self.dropped_overlong + self.dropped_no_loss

    def estimated_trained_tokens(self, epochs: float) -> int:
        """Training tokens processed over `epochs` passes (train tokens x epochs)."""
        return round(self.train.tokens * epochs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "splits": {name: s.to_dict() for name, s in self.splits.items()},
            "maxSeqLength": self.max_seq_length,
            "truncated": self.truncated,
            "dropped": self.dropped,
            "droppedDuplicates": self.dropped_duplicates,
            "droppedOverlong": self.dropped_overlong,
            "droppedNoLossTokens": self.dropped_no_loss,
        }
        if self.label_counts is not None:
            out["labelCounts"] = self.label_counts
        return out

    def render_lines(self) -> list[str]:
        lines = []
        for name, s in self.splits.items():
            loss = f" ({s.loss_tokens} in the loss)" if s.loss_tokens else ""
            lines.append(
                f"{name:>10}: {s.examples} examples, {s.tokens} tokens{loss}, "
                f"mean {s.mean_length}, max {s.max_length}"
            )
        if self.truncated or self.dropped:
            lines.append(
                f"Truncated {self.truncated} to {self.max_seq_length} tokens; dropped "
                f"{self.dropped_duplicates} duplicates, {self.dropped_overlong} overlong, "
                f"{self.dropped_no_loss} without loss tokens"
            )
        if self.label_counts:
            for name, counts in self.label_counts.items():
                pretty = ", ".join(f"{k}={v}" for k, v in counts.items())
                lines.append(f"{name:>10} labels: {pretty}")
        return lines
