"""Which run an output location belongs to: a fingerprint of the training-relevant settings
and of the training data's content, stored as `fingerprint.json` in the output.

A run resumes from (or republishes) an output only when the fingerprints are equal; a run of a
different config or different data is refused, so two runs are never mixed. What counts as
training-relevant is listed in docs/training.md ("Resume only the same run").
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from finetune_trainer import output_files
from finetune_trainer.config import RunConfig

FILE = "fingerprint.json"

# Training settings that change what is learned. The run's length (epochs, maxSteps) is not
# one: a longer run continues from the checkpoint. Neither are saving, logging or evaluation
# cadence, nor speed knobs (gradientCheckpointing, ligerKernel, attention, paddingFree).
TRAINING_FIELDS = (
    "learningRate",
    "batchSize",
    "batchTokens",
    "gradientAccumulationSteps",
    "warmupRatio",
    "scheduler",
    "weightDecay",
    "maxGradNorm",
    "precision",
    "seed",
    "earlyStopping",
)
MODEL_FIELDS = ("source", "revision", "dtype")
DATA_DIGESTS = {
    "dataset.trainExamples": "the training examples",
    "dataset.validationExamples": "the validation examples",
}


class DifferentRunError(Exception):
    """The output location holds another run's checkpoints or results."""


def _flatten(prefix: str, value: Any, into: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}", item, into)
    else:
        into[prefix] = value


def _is_numeric_list(kind: Any) -> bool:
    import pyarrow as pa  # type: ignore[import-untyped]

    is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind)
    return bool(
        is_list and (pa.types.is_integer(kind.value_type) or pa.types.is_floating(kind.value_type))
    )


def examples_digest(dataset: Any) -> str | None:
    """SHA-256 of a tokenized split's content (every column, in order); None without a split.
    Independent of how the rows are chunked in memory."""
    if dataset is None:
        return None
    table = dataset.with_format("arrow")[:]
    digest = hashlib.sha256()
    for name in sorted(table.column_names):
        column = table.column(name)
        digest.update(f"{name}:{column.type}\n".encode())
        if _is_numeric_list(column.type):
            for chunk in column.chunks:
                digest.update(chunk.flatten().to_numpy(zero_copy_only=False).tobytes())
            digest.update(b"|lengths|")
            for chunk in column.chunks:
                digest.update(chunk.value_lengths().to_numpy(zero_copy_only=False).tobytes())
        else:
            digest.update(json.dumps(column.to_pylist()).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Fingerprint:
    """The training-relevant settings of a run, flat (`training.learningRate`: value)."""

    fields: dict[str, Any]

    @property
    def digest(self) -> str:
        """SHA-256 of the fields, as canonical JSON."""
        text = json.dumps(self.fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def to_json(self) -> str:
        """What fingerprint.json holds: the digest and the fields it covers."""
        return json.dumps({"digest": self.digest, "fields": self.fields}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Fingerprint:
        """Parse fingerprint.json."""
        return cls(fields=dict(json.loads(text)["fields"]))

    def differences(self, new: Fingerprint) -> list[str]:
        """What changed from this (the stored run) to `new`, one phrase per field."""
        changed = []
        for key in sorted(self.fields.keys() | new.fields.keys()):
            old_value, new_value = self.fields.get(key), new.fields.get(key)
            if old_value == new_value:
                continue
            if key in DATA_DIGESTS:
                changed.append(f"{DATA_DIGESTS[key]} differ")
            else:
                changed.append(f"{key} {json.dumps(old_value)} -> {json.dumps(new_value)}")
        return changed


def of_run(run: RunConfig, prepared: Any) -> Fingerprint:
    """The fingerprint of `run` on its prepared (tokenized) data."""
    fields: dict[str, Any] = {"task": run.task}
    model = run.model.model_dump(by_alias=True, mode="json")
    for key in MODEL_FIELDS:
        fields[f"model.{key}"] = model[key]
    _flatten("method", run.method.model_dump(by_alias=True, mode="json"), fields)
    training = run.training.model_dump(by_alias=True, mode="json")
    for key in TRAINING_FIELDS:
        _flatten(f"training.{key}", training[key], fields)
    if fields["training.batchTokens"] == "auto":  # as outputs written before it existed
        del fields["training.batchTokens"]
    if run.training.early_stopping is not None:  # patience counts evaluations
        fields["training.evalSteps"] = training["evalSteps"]
    if run.preference:  # absent for sft, so runs written before objectives existed still match
        for key in ("objective", "dpo", "orpo"):
            _flatten(f"training.{key}", training[key], fields)
    fields["dataset.packing"] = run.dataset.packing
    fields["dataset.completionOnlyLoss"] = bool(prepared.completion_only_loss)
    fields["dataset.labels"] = prepared.label_names
    fields["dataset.trainExamples"] = examples_digest(prepared.train)
    fields["dataset.validationExamples"] = examples_digest(prepared.eval)
    return Fingerprint(fields)


def _start_over(output_uri: str) -> str:
    return f"choose another output.uri (--output locally), or delete {output_uri} to start over"


def stored(output_uri: str) -> Fingerprint | None:
    """The fingerprint recorded in the output location, if any."""
    text = output_files.read_text(output_files.join(output_uri, FILE))
    if text is None:
        return None
    try:
        return Fingerprint.from_json(text)
    except (ValueError, KeyError, TypeError) as exc:
        raise DifferentRunError(
            f"output.uri: {output_uri} holds an unreadable {FILE} ({exc}), so it may be another "
            f"run's; {_start_over(output_uri)}"
        ) from None


def check(output_uri: str, fingerprint: Fingerprint, *, has_checkpoints: bool) -> None:
    """Raise DifferentRunError unless the output is empty of runs or holds this same run."""
    start_over = _start_over(output_uri)
    previous = stored(output_uri)
    if previous is None:
        if has_checkpoints:
            raise DifferentRunError(
                f"output.uri: {output_uri} holds checkpoints without a {FILE}, so they may be "
                f"another run's; {start_over}"
            )
        return
    changed = previous.differences(fingerprint)
    if changed:
        shown = "; ".join(changed[:3]) + (
            f"; and {len(changed) - 3} more" if len(changed) > 3 else ""
        )
        raise DifferentRunError(
            f"output.uri: {output_uri} holds a different run ({shown}); resuming would mix two "
            f"runs: {start_over}"
        )


def record(output_uri: str, fingerprint: Fingerprint) -> None:
    """Store the fingerprint in the output location (before the first checkpoint)."""
    if stored(output_uri) != fingerprint:
        output_files.write_text(output_files.join(output_uri, FILE), fingerprint.to_json())
