"""Render records to text plus the character spans the loss counts.

- alpaca: the Stanford Alpaca prompt (ALPACA_PROMPT / ALPACA_PROMPT_NO_INPUT), the response is
  the completion;
- completion: ``prompt + completion`` verbatim (put your own separator in the data);
- chat: the tokenizer's chat template, or ``dataset.template`` (a Jinja string or ``chatml``),
  ChatML when the tokenizer has none; every assistant turn, with its end-of-turn marker, is a
  completion span;
- text: the text, all of it counted.

The end-of-sequence token is appended after tokenization (see tokenize.py), not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

CHATML = "chatml"
#: The ChatML template as Jinja (what `chatml` means; also used to describe the fallback).
CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

Span = tuple[int, int]


@dataclass(slots=True)
class Rendered:
    """A rendered example: its text and the [start, end) character spans of the completion."""

    text: str
    spans: list[Span]


class TemplateError(ValueError):
    """A chat template failed on a record."""


def render_alpaca(record: dict[str, str]) -> Rendered:
    instruction = record["instruction"]
    extra = record.get("input") or ""
    if extra.strip():
        prompt = ALPACA_PROMPT.format(instruction=instruction, input=extra)
    else:
        prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    text = prompt + record["output"]
    return Rendered(text, [(len(prompt), len(text))])


def render_completion(record: dict[str, str]) -> Rendered:
    prompt = record["prompt"]
    text = prompt + record["completion"]
    return Rendered(text, [(len(prompt), len(text))])


def render_text(record: dict[str, str]) -> Rendered:
    text = record["text"]
    return Rendered(text, [(0, len(text))])


def _rstrip(text: str, spans: list[Span]) -> Rendered:
    """Drop trailing whitespace (the eos token follows) and clip the spans to the text."""
    text = text.rstrip()
    end = len(text)
    clipped = [(s, min(e, end)) for s, e in spans if s < end]
    return Rendered(text, clipped)


class ChatRenderer:
    """Renders chat records with one template and finds each assistant turn's span.

    For a Jinja template, the span of assistant turn i is found incrementally: the text of
    ``messages[:i]`` with the generation prompt is a prefix of the text of ``messages[:i+1]``,
    and the difference is the assistant's turn (content and end-of-turn marker). Templates that
    rewrite earlier turns break that; then the span is the assistant content found by search
    (to the end of the text for the last message), and `non_incremental` counts those turns.
    """

    def __init__(
        self, tokenizer: Any, template: str | None, system_prompt: str | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.non_incremental = 0
        own = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
        if template is not None and template.strip().lower() == CHATML:
            self.template: str | None = None
            self.description = "ChatML (dataset.template: chatml)"
        elif template is not None:
            self.template = template
            self.description = "the Jinja template in dataset.template"
        elif isinstance(own, str) and own:
            self.template = own
            self.description = "the tokenizer's chat template"
        else:
            self.template = None
            self.description = "ChatML (the tokenizer has no chat template)"
        if self.template is not None and tokenizer is None:
            raise ValueError("a Jinja chat template needs a tokenizer to render")

    @property
    def is_chatml(self) -> bool:
        return self.template is None

    def messages(self, record: dict[str, Any]) -> list[dict[str, str]]:
        messages: list[dict[str, str]] = record["messages"]
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def render(self, record: dict[str, Any]) -> Rendered:
        messages = self.messages(record)
        if self.template is None:
            return self._render_chatml(messages)
        return self._render_jinja(messages)

    @staticmethod
    def _render_chatml(messages: list[dict[str, str]]) -> Rendered:
        parts: list[str] = []
        spans: list[Span] = []
        pos = 0
        for message in messages:
            header = f"<|im_start|>{message['role']}\n"
            body = message["content"] + "<|im_end|>\n"
            if message["role"] == "assistant":
                spans.append((pos + len(header), pos + len(header) + len(body)))
            parts.append(header)
            parts.append(body)
            pos += len(header) + len(body)
        return _rstrip("".join(parts), spans)

    def _apply(self, messages: list[dict[str, str]], generation: bool) -> str:
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=generation,
            )
        except Exception as exc:  # jinja raise_exception(), TemplateError, TypeError, ...
            raise TemplateError(f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(text, str):  # pragma: no cover - defensive, API returns str
            raise TemplateError("the chat template did not render to a string")
        return text

    def _render_jinja(self, messages: list[dict[str, str]]) -> Rendered:
        full = self._apply(messages, generation=False)
        spans: list[Span] = []
        cursor = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            span: Span | None = None
            try:
                before = self._apply(messages[:i], generation=True) if i else ""
                upto = full if i == len(messages) - 1 else self._apply(messages[: i + 1], False)
                if len(upto) > len(before) and upto.startswith(before) and full.startswith(upto):
                    span = (len(before), len(upto))
            except TemplateError:
                span = None  # e.g. a template that refuses a conversation ending with a user
            if span is None:
                self.non_incremental += 1
                start = full.find(message["content"], cursor)
                if start < 0:
                    raise TemplateError(
                        "the chat template does not reproduce the assistant content verbatim"
                    )
                end = start + len(message["content"])
                if i == len(messages) - 1:
                    end = len(full)  # the last turn: its end-of-turn marker runs to the end
                span = (start, end)
            spans.append(span)
            cursor = span[1]
        return _rstrip(full, spans)
