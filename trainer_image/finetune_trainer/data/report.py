"""The validation report: issues per kind with counts and the first examples, and DatasetError."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from finetune_trainer.data.records import Origin

Severity = Literal["error", "warning"]
MAX_EXAMPLES = 5

#: Issue kinds and how they are titled in messages.
KINDS: dict[str, str] = {
    "source": "dataset source",
    "encoding": "not UTF-8 text",
    "layout": "file layout",
    "unknown_format": "unrecognised format",
    "malformed": "malformed record",
    "not_an_object": "record is not an object",
    "missing_field": "missing field",
    "empty_field": "empty field",
    "wrong_type": "wrong type",
    "unknown_role": "unknown chat role",
    "no_assistant": "chat without an assistant turn",
    "template_error": "chat template failed",
    "unknown_label": "unknown label",
    "label_set": "label set",
    "overlong": "longer than maxSeqLength",
    "no_loss_tokens": "no loss tokens left after truncation",
    "duplicate": "duplicate record",
    "identical_answers": "chosen identical to rejected",
    "conflicting_fields": "conflicting fields",
    "bad_history": "chat history not ending with a user turn",
    "prompt_too_long": "prompt leaves no room for an answer",
    "split": "split",
    "settings": "dataset settings",
}


@dataclass(slots=True)
class Issue:
    """One problem with one record (or with the dataset as a whole when origin is None)."""

    kind: str
    message: str
    origin: Origin | None = None

    def __str__(self) -> str:
        return f"{self.origin}: {self.message}" if self.origin else self.message

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"message": self.message}
        if self.origin is not None:
            out.update(self.origin.to_dict())
        return out


@dataclass
class IssueGroup:
    """All issues of one kind: a count, the first examples and what was done about them."""

    kind: str
    severity: Severity
    count: int = 0
    examples: list[Issue] = field(default_factory=list)
    action: str | None = None  # soft issues: "dropped", "kept", "truncated"

    @property
    def title(self) -> str:
        return KINDS.get(self.kind, self.kind.replace("_", " "))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "severity": self.severity,
            "count": self.count,
            "examples": [i.to_dict() for i in self.examples],
        }
        if self.action:
            out["action"] = self.action
        return out


@dataclass
class ValidationReport:
    """What validation found, per issue kind, plus what was detected and decided.

    ``groups`` maps an issue kind to its :class:`IssueGroup`; hard errors have severity
    ``error`` (the run stops), soft issues ``warning`` (handled as configured and reported).
    ``stats`` is filled in by ``prepare_dataset`` once the data is tokenized.
    """

    source: str
    format: str | None = None
    format_reason: str | None = None
    records: int = 0
    sources: dict[str, tuple[str, int]] = field(default_factory=dict)  # role -> (uri, records)
    groups: dict[str, IssueGroup] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stats: Any = None  # TokenStats, set by prepare_dataset

    # -- building -----------------------------------------------------------------------------
    def add(
        self,
        kind: str,
        message: str,
        origin: Origin | None = None,
        *,
        severity: Severity = "error",
        action: str | None = None,
    ) -> None:
        group = self.groups.get(kind)
        if group is None:
            group = self.groups[kind] = IssueGroup(kind, severity, action=action)
        group.count += 1
        if len(group.examples) < MAX_EXAMPLES:
            group.examples.append(Issue(kind, message, origin))

    def add_issue(self, issue: Issue, *, severity: Severity = "error") -> None:
        self.add(issue.kind, issue.message, issue.origin, severity=severity)

    def count_source(self, role: str, uri: str, records: int) -> None:
        """Records read from one source (`role`: train, validation, test, mix[0], ...)."""
        self.records += records
        self.sources[role] = (uri, records)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)

    # -- reading ------------------------------------------------------------------------------
    @property
    def errors(self) -> list[IssueGroup]:
        return [g for g in self.groups.values() if g.severity == "error"]

    @property
    def soft(self) -> list[IssueGroup]:
        return [g for g in self.groups.values() if g.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def error_count(self) -> int:
        return sum(g.count for g in self.errors)

    def count(self, kind: str) -> int:
        group = self.groups.get(kind)
        return group.count if group else 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": self.source,
            "ok": self.ok,
            "format": self.format,
            "formatReason": self.format_reason,
            "records": self.records,
            "sources": {
                role: {"source": uri, "records": n} for role, (uri, n) in self.sources.items()
            },
            "errors": [g.to_dict() for g in self.errors],
            "softIssues": [g.to_dict() for g in self.soft],
            "warnings": list(self.warnings),
            "notes": list(self.notes),
        }
        if self.stats is not None:
            out["stats"] = self.stats.to_dict()
        return out

    def _group_lines(self, group: IssueGroup) -> list[str]:
        head = f"- {group.title} ({group.count})"
        if group.action:
            head += f" ({group.action})"
        lines = [head]
        lines += [f"    {issue}" for issue in group.examples]
        if group.count > len(group.examples):
            lines.append(f"    ... and {group.count - len(group.examples)} more")
        return lines

    def error_message(self) -> str:
        """The message of a DatasetError: every hard error kind, first examples, what to do."""
        n = self.error_count
        head = f"dataset {self.source}: {n} problem{'s stop' if n != 1 else ' stops'} the run"
        if self.format:
            head += f" (format {self.format}"
            head += f"; {self.format_reason})" if self.format_reason else ")"
        lines = [head + ":"]
        for group in self.errors:
            lines += self._group_lines(group)
        if self.soft:
            lines.append("Also found (handled as configured, not errors):")
            for group in self.soft:
                lines += self._group_lines(group)
        if any(issue.origin for group in self.errors for issue in group.examples):
            lines.append(
                "Fix or remove these records (line numbers are 1-based) and check again with "
                "`finetune validate`."
            )
        return "\n".join(lines)

    def render(self) -> str:
        """A plain-text summary for the terminal (token statistics: ``stats.render_lines()``).

        The text may contain user data: print it without markup parsing (rich: markup=False).
        """
        lines = [f"Dataset {self.source}: {self.records} records"]
        if len(self.sources) > 1:
            lines = ["Dataset sources:"] + [
                f"  {role}: {uri} ({n} records)" for role, (uri, n) in self.sources.items()
            ]
        if self.format:
            reason = f" ({self.format_reason})" if self.format_reason else ""
            lines.append(f"Format: {self.format}{reason}")
        if self.errors:
            lines.append(f"Errors ({self.error_count}):")
            for group in self.errors:
                lines += self._group_lines(group)
        if self.soft:
            lines.append("Handled:")
            for group in self.soft:
                lines += self._group_lines(group)
        for warning in self.warnings:
            lines.append(f"Warning: {warning}")
        for note in self.notes:
            lines.append(f"Note: {note}")
        lines.append("OK" if self.ok else "INVALID: the run would stop with exit code 65")
        return "\n".join(lines)


class DatasetError(Exception):
    """The dataset cannot be used: `str(err)` says what to fix; `report` has the details."""

    def __init__(self, report: ValidationReport) -> None:
        super().__init__(report.error_message())
        self.report = report


def fail(report: ValidationReport, kind: str, message: str) -> DatasetError:
    """A DatasetError for one dataset-wide problem (no origin)."""
    report.add(kind, message)
    return DatasetError(report)
