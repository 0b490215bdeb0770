"""Record formats: which fields each needs, auto-detection, and per-record checks.

Formats and their fields (extra fields are ignored and reported once as a note):

================ ============================================ ==============================
format           required                                     optional
================ ============================================ ==============================
alpaca           instruction (str), output (str)              input (str)
chat             messages: [{role, content}], roles system/    --
                 user/assistant, at least one assistant turn
completion       prompt (str), completion (str)               --
text             text (str)                                   --
classification   text (str), label (str or int)               --
preference       chosen, rejected (str, or one assistant      --
                 message); and prompt (str) or messages (the
                 chat history the answers reply to)
================ ============================================ ==============================

Preference records come in two variants: plain (``prompt`` text, answers appended verbatim, as
the completion format) and chat (``messages``: a history ending with a user turn, rendered
with the chat template; TRL's conversational layout, a ``prompt`` list of messages and the
answers as ``[{"role": "assistant", ...}]``, is accepted too).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from finetune_trainer.data.records import Origin
from finetune_trainer.data.report import Issue

FORMATS = ("alpaca", "chat", "completion", "text", "classification", "preference")
CHAT_ROLES = ("system", "user", "assistant")
ROLE_HINTS = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}

REQUIRED: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "completion": ("prompt", "completion"),
    "text": ("text",),
    "classification": ("text", "label"),
    "preference": ("chosen", "rejected"),
}
OPTIONAL: dict[str, tuple[str, ...]] = {"alpaca": ("input",), "preference": ("prompt", "messages")}
# Detection order for causal LM data: the first signature a record fully matches wins.
SIGNATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("preference", ("chosen", "rejected")),
    ("chat", ("messages",)),
    ("alpaca", ("instruction", "output")),
    ("completion", ("prompt", "completion")),
    ("text", ("text",)),
)


def fields_of(fmt: str) -> tuple[str, ...]:
    return REQUIRED[fmt] + OPTIONAL.get(fmt, ())


def _signature(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    for fmt, keys in SIGNATURES:
        if all(k in record for k in keys):
            return fmt
    return None


def detect_format(records: list[Any], task: str) -> tuple[str | None, str]:
    """Pick the format most records match; returns (format or None, human-readable reason)."""
    if task == "sequence-classification":
        return "classification", "task is sequence-classification (text + label)"
    votes: Counter[str] = Counter()
    for record in records:
        fmt = _signature(record)
        if fmt is not None:
            votes[fmt] += 1
    total = len(records)
    if not votes:
        keys: Counter[str] = Counter()
        for record in records[:1000]:
            if isinstance(record, dict):
                keys.update(record.keys())
        seen = ", ".join(k for k, _ in keys.most_common(8)) or "none"
        return None, (
            "no record has the fields of a known format: messages (chat), instruction + output "
            "(alpaca), prompt + completion (completion), text (text) or chosen + rejected "
            "(preference); fields found: "
            f"{seen}. Rename the fields or set dataset.format"
        )
    order = [fmt for fmt, _ in SIGNATURES]
    best = max(votes, key=lambda f: (votes[f], -order.index(f)))
    fields = " + ".join(REQUIRED[best])
    reason = f"auto-detected: {votes[best]} of {total} records have {fields}"
    others = {f: n for f, n in votes.items() if f != best}
    if others:
        reason += " (also seen: " + ", ".join(f"{f} {n}" for f, n in others.items()) + ")"
    return best, reason


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "boolean",
        int: "number",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }.get(type(value), type(value).__name__)


def _check_text(
    record: dict[str, Any], key: str, origin: Origin, issues: list[Issue], required: bool
) -> str | None:
    if key not in record or (record[key] is None and not required):
        if required:
            have = ", ".join(sorted(record)) or "no fields"
            issues.append(Issue("missing_field", f"field '{key}' is missing (has: {have})", origin))
        return None
    value = record[key]
    if value is None:
        issues.append(Issue("empty_field", f"field '{key}' is null", origin))
        return None
    if not isinstance(value, str):
        issues.append(
            Issue("wrong_type", f"field '{key}' must be a string, got {_type_name(value)}", origin)
        )
        return None
    if required and not value.strip():
        issues.append(Issue("empty_field", f"field '{key}' is empty", origin))
        return None
    return value


def _check_messages(record: dict[str, Any], key: str, origin: Origin, issues: list[Issue]) -> Any:
    """The messages list under `key`, each {role, content} checked; None after adding issues."""
    if key not in record:
        have = ", ".join(sorted(record)) or "no fields"
        issues.append(Issue("missing_field", f"field '{key}' is missing (has: {have})", origin))
        return None
    messages = record[key]
    if not isinstance(messages, list):
        issues.append(
            Issue(
                "wrong_type",
                f"field '{key}' must be an array of {{role, content}}, got {_type_name(messages)}",
                origin,
            )
        )
        return None
    if not messages:
        issues.append(Issue("empty_field", f"field '{key}' is empty", origin))
        return None
    clean: list[dict[str, str]] = []
    before = len(issues)
    for i, message in enumerate(messages):
        where = f"{key}[{i}]"
        if not isinstance(message, dict):
            issues.append(
                Issue("wrong_type", f"{where} must be an object, got {_type_name(message)}", origin)
            )
            continue
        role = message.get("role")
        content = message.get("content")
        if role is None:
            issues.append(Issue("missing_field", f"{where}.role is missing", origin))
        elif not isinstance(role, str):
            issues.append(
                Issue(
                    "wrong_type", f"{where}.role must be a string, got {_type_name(role)}", origin
                )
            )
        elif role not in CHAT_ROLES:
            hint = f" (did you mean '{ROLE_HINTS[role]}'?)" if role in ROLE_HINTS else ""
            issues.append(
                Issue(
                    "unknown_role",
                    f"{where}.role is '{role}'; expected one of system, user, assistant{hint}",
                    origin,
                )
            )
        if "content" not in message:
            issues.append(Issue("missing_field", f"{where}.content is missing", origin))
        elif not isinstance(content, str):
            issues.append(
                Issue(
                    "wrong_type" if content is not None else "empty_field",
                    f"{where}.content must be a string, got {_type_name(content)}",
                    origin,
                )
            )
        elif not content.strip():
            issues.append(Issue("empty_field", f"{where}.content is empty", origin))
        if isinstance(role, str) and isinstance(content, str):
            clean.append({"role": role, "content": content})
    return None if len(issues) > before else clean


def _check_chat(record: dict[str, Any], origin: Origin, issues: list[Issue]) -> Any:
    clean = _check_messages(record, "messages", origin, issues)
    if clean is None:
        return None
    if not any(m["role"] == "assistant" for m in clean):
        issues.append(
            Issue("no_assistant", "the conversation has no assistant message to learn", origin)
        )
        return None
    return {"messages": clean}


def _check_answer(record: dict[str, Any], key: str, origin: Origin, issues: list[Issue]) -> Any:
    """A preference answer: a string, or a list of one assistant message (TRL's layout)."""
    value = record.get(key)
    if not isinstance(value, list):
        return _check_text(record, key, origin, issues, required=True)
    messages = _check_messages(record, key, origin, issues)
    if messages is None:
        return None
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        issues.append(
            Issue(
                "wrong_type",
                f"field '{key}' must be a string or one assistant message, got "
                f"{len(messages)} messages",
                origin,
            )
        )
        return None
    return messages[0]["content"]


def _check_preference(record: dict[str, Any], origin: Origin, issues: list[Issue]) -> Any:
    """A preference pair: the prompt (text) or chat history, and two different answers."""
    before = len(issues)
    chosen = _check_answer(record, "chosen", origin, issues)
    rejected = _check_answer(record, "rejected", origin, issues)
    out: dict[str, Any] = {}
    history_key = "messages" if "messages" in record else None
    if isinstance(record.get("prompt"), list):
        history_key = "prompt" if history_key is None else history_key
    if "messages" in record and "prompt" in record:
        issues.append(
            Issue(
                "conflicting_fields",
                "set either 'prompt' (text) or 'messages' (chat history), not both",
                origin,
            )
        )
    elif history_key is not None:
        messages = _check_messages(record, history_key, origin, issues)
        if messages is not None and messages[-1]["role"] == "assistant":
            issues.append(
                Issue(
                    "bad_history",
                    f"{history_key}[{len(messages) - 1}] is an assistant turn: the history must "
                    "end with the user turn that chosen and rejected answer",
                    origin,
                )
            )
        out["messages"] = messages
    elif "prompt" not in record:
        have = ", ".join(sorted(record)) or "no fields"
        issues.append(
            Issue(
                "missing_field",
                f"field 'prompt' (or 'messages' for chat) is missing (has: {have})",
                origin,
            )
        )
    else:
        out["prompt"] = _check_text(record, "prompt", origin, issues, required=True)
    if len(issues) > before:
        return None
    if chosen.strip() == rejected.strip():
        issues.append(
            Issue(
                "identical_answers",
                "chosen and rejected are the same answer: the pair expresses no preference",
                origin,
            )
        )
        return None
    return {**out, "chosen": chosen, "rejected": rejected}


def check_record(record: Any, fmt: str, origin: Origin, issues: list[Issue]) -> Any:
    """Validate one record as `fmt`: return the normalised record, or None after adding issues."""
    if not isinstance(record, dict):
        issues.append(
            Issue("not_an_object", f"expected a JSON object, got {_type_name(record)}", origin)
        )
        return None
    if fmt == "chat":
        return _check_chat(record, origin, issues)
    if fmt == "preference":
        return _check_preference(record, origin, issues)
    before = len(issues)
    out: dict[str, Any] = {}
    for key in REQUIRED[fmt]:
        if fmt == "classification" and key == "label":
            out[key] = _check_label(record, origin, issues)
        else:
            out[key] = _check_text(record, key, origin, issues, required=True)
    for key in OPTIONAL.get(fmt, ()):
        value = _check_text(record, key, origin, issues, required=False)
        out[key] = value or ""
    return out if len(issues) == before else None


def _check_label(record: dict[str, Any], origin: Origin, issues: list[Issue]) -> Any:
    if "label" not in record:
        have = ", ".join(sorted(record)) or "no fields"
        issues.append(Issue("missing_field", f"field 'label' is missing (has: {have})", origin))
        return None
    value = record["label"]
    if value is None:
        issues.append(Issue("empty_field", "field 'label' is null", origin))
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        issues.append(
            Issue(
                "wrong_type",
                f"field 'label' must be a string or an integer, got {_type_name(value)}",
                origin,
            )
        )
        return None
    if isinstance(value, str) and not value.strip():
        issues.append(Issue("empty_field", "field 'label' is empty", origin))
        return None
    return value


def unused_fields(records: list[Any], fmt: str) -> Counter[str]:
    """Fields present in records that `fmt` does not use (typos show up here)."""
    used = set(fields_of(fmt))
    extra: Counter[str] = Counter()
    for record in records:
        if isinstance(record, dict):
            extra.update(k for k in record if k not in used)
    return extra
