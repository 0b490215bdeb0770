"""Each record format: detection, rendering, tokenization and the completion mask."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer.config import DatasetSpec
from finetune_trainer.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    DatasetError,
    PreparedDataset,
    prepare_dataset,
)

ZEPHYR = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture
def templated_tok(tiny_tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = ZEPHYR
    return tok


def write_jsonl(path: Path, rows: list[Any]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def prepare(tok: Any, rows: list[dict[str, Any]], task: str = "causal-lm", **spec: Any) -> Any:
    ds = DatasetSpec.model_validate({"inline": rows, **spec})
    return prepare_dataset(ds, task, tok, seed=0)  # type: ignore[arg-type]


def decoded(tok: Any, prepared: PreparedDataset, i: int = 0) -> tuple[str, str]:
    row = prepared.train[i]
    ids, mask = row["input_ids"], row["completion_mask"]
    return tok.decode(ids), tok.decode([t for t, m in zip(ids, mask, strict=True) if m])


def test_import_does_not_pull_heavy_libraries() -> None:
    code = (
        "import sys, finetune_trainer.data, finetune_trainer.storage; "
        "print(sorted(m for m in ('torch','datasets','transformers','fsspec') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- alpaca ---------------------------------------------------------------------------------------
def test_alpaca_with_and_without_input(tok: Any) -> None:
    rows = [
        {"instruction": "Name the capital.", "input": "Greece", "output": "Athens."},
        {"instruction": "Say hi.", "output": "Hi!"},
    ]
    prepared = prepare(tok, rows)
    assert prepared.format == "alpaca"
    assert "auto-detected: 2 of 2 records have instruction + output" in (
        prepared.report.format_reason or ""
    )
    text, loss = decoded(tok, prepared, 0)
    prompt = ALPACA_PROMPT.format(instruction="Name the capital.", input="Greece")
    assert text == prompt + "Athens.<|endoftext|>"
    assert loss == "Athens.<|endoftext|>"
    text, loss = decoded(tok, prepared, 1)
    assert text == ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi.") + "Hi!<|endoftext|>"
    assert loss == "Hi!<|endoftext|>"
    assert prepared.train[0]["input_ids"][-1] == tok.eos_token_id


def test_mask_is_exactly_the_prompt_tokens(tok: Any) -> None:
    """The masked-out prefix tokenizes to the prompt alone; the rest is the completion + eos."""
    prepared = prepare(
        tok, [{"instruction": "Reverse the word.", "input": "stone", "output": "enots"}]
    )
    row = prepared.train[0]
    ids, mask = row["input_ids"], row["completion_mask"]
    n_prompt = mask.index(1)
    assert all(m == 0 for m in mask[:n_prompt]) and all(m == 1 for m in mask[n_prompt:])
    prompt = ALPACA_PROMPT.format(instruction="Reverse the word.", input="stone")
    assert tok.decode(ids[:n_prompt]) == prompt
    assert ids[:n_prompt] == tok(prompt)["input_ids"]


def test_completion_only_loss_off(tok: Any) -> None:
    prepared = prepare(tok, [{"instruction": "Say hi.", "output": "Hi!"}], completionOnlyLoss=False)
    assert set(prepared.train[0]["completion_mask"]) == {1}
    assert prepared.completion_only_loss is False


# -- completion -----------------------------------------------------------------------------------
def test_completion_format(tok: Any) -> None:
    prepared = prepare(tok, [{"prompt": "Q: capital of France?\nA:", "completion": " Paris"}])
    assert prepared.format == "completion"
    text, loss = decoded(tok, prepared)
    assert text == "Q: capital of France?\nA: Paris<|endoftext|>"
    assert loss == " Paris<|endoftext|>"


def test_completion_token_straddling_the_boundary_counts(tok: Any) -> None:
    """'A: ' + 'Paris' tokenizes ' Paris' as one token: it holds completion text, so it counts."""
    prepared = prepare(tok, [{"prompt": "A: ", "completion": "Paris"}])
    _, loss = decoded(tok, prepared)
    assert loss.endswith("Paris<|endoftext|>")


# -- text -----------------------------------------------------------------------------------------
def test_text_format_all_tokens_and_eos(tok: Any) -> None:
    prepared = prepare(tok, [{"text": "The quick brown fox."}, {"text": "jumps over"}])
    assert prepared.format == "text"
    text, loss = decoded(tok, prepared)
    assert text == loss == "The quick brown fox.<|endoftext|>"
    assert set(prepared.train[1]["completion_mask"]) == {1}
    assert prepared.completion_only_loss is False


def test_completion_only_loss_on_text_is_an_error(tok: Any) -> None:
    with pytest.raises(DatasetError, match="completionOnlyLoss: text data has no prompt"):
        prepare(tok, [{"text": "hello"}], completionOnlyLoss=True)


# -- chat -----------------------------------------------------------------------------------------
CHAT = [
    {
        "messages": [
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."},
        ]
    }
]


def test_chat_chatml_fallback_multi_turn(tok: Any) -> None:
    prepared = prepare(tok, CHAT)
    assert prepared.format == "chat"
    assert any("ChatML (the tokenizer has no chat template)" in n for n in prepared.report.notes)
    text, loss = decoded(tok, prepared)
    assert text == (
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nGoodbye.<|im_end|><|endoftext|>"
    )
    # both assistant turns (with their end-of-turn markers) and eos; no user text
    assert loss == "Hello!<|im_end|>\nGoodbye.<|im_end|><|endoftext|>"


def test_chat_system_prompt_prepended_when_missing(tok: Any) -> None:
    rows = [
        CHAT[0],
        {
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "Why?"},
                {"role": "assistant", "content": "Because."},
            ]
        },
    ]
    prepared = prepare(tok, rows, systemPrompt="You are helpful.")
    first, _ = decoded(tok, prepared, 0)
    second, loss = decoded(tok, prepared, 1)
    assert first.startswith("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n")
    assert second.startswith("<|im_start|>system\nBe terse.<|im_end|>")
    assert "You are helpful." not in second
    assert loss == "Because.<|im_end|><|endoftext|>"


def test_chat_uses_the_tokenizers_template(templated_tok: Any) -> None:
    prepared = prepare(templated_tok, CHAT)
    assert any("the tokenizer's chat template" in n for n in prepared.report.notes)
    text, loss = decoded(templated_tok, prepared)
    assert text == (
        "<|user|>\nHi there<|endoftext|>\n<|assistant|>\nHello!<|endoftext|>\n"
        "<|user|>\nBye<|endoftext|>\n<|assistant|>\nGoodbye.<|endoftext|>"
    )
    assert text.count("<|endoftext|>") == 4  # eos already last: not appended twice
    assert loss == "Hello!<|endoftext|>\nGoodbye.<|endoftext|>"


def test_chat_template_override_chatml_and_jinja(templated_tok: Any) -> None:
    chatml = prepare(templated_tok, CHAT, template="chatml")
    assert decoded(templated_tok, chatml)[0].startswith("<|im_start|>user\nHi there")
    custom = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    prepared = prepare(templated_tok, CHAT, template=custom)
    text, loss = decoded(templated_tok, prepared)
    assert text == "user: Hi there\nassistant: Hello!\nuser: Bye\nassistant: Goodbye.<|endoftext|>"
    # no generation prompt in this template: the role header is part of the assistant turn
    assert loss == "assistant: Hello!\nassistant: Goodbye.<|endoftext|>"


def test_chat_template_that_rewrites_earlier_turns(templated_tok: Any) -> None:
    custom = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
        "{% if loop.last %} END{% endif %}\n{% endfor %}"
    )
    prepared = prepare(templated_tok, CHAT, template=custom)
    _, loss = decoded(templated_tok, prepared)
    # found by search: the content of the first turn; the last turn runs to the end
    assert loss == "Hello!Goodbye. END<|endoftext|>"
    assert any("rewrites earlier turns for 2" in w for w in prepared.report.warnings)


def test_chat_template_error_is_reported_with_line(tmp_path: Path, templated_tok: Any) -> None:
    strict = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    rows = [CHAT[0], {"messages": [{"role": "system", "content": "x"}, *CHAT[0]["messages"]]}]
    spec = DatasetSpec(source=write_jsonl(tmp_path / "c.jsonl", rows), template=strict)
    with pytest.raises(DatasetError) as err:
        prepare_dataset(spec, "causal-lm", templated_tok, seed=0)
    assert "c.jsonl:2: TemplateError: System role not supported" in str(err.value)


# -- classification ---------------------------------------------------------------------------
def test_classification_labels_sorted_and_declared(tok: Any) -> None:
    rows = [
        {"text": "great film", "label": "pos"},
        {"text": "awful film", "label": "neg"},
        {"text": "fine film", "label": "pos"},
    ]
    prepared = prepare(tok, rows, task="sequence-classification")
    assert prepared.format == "classification"
    assert prepared.label_names == ["neg", "pos"]
    assert prepared.train["labels"] == [1, 0, 1]
    row = prepared.train[0]
    assert set(row) == {"input_ids", "attention_mask", "labels"}
    assert row["attention_mask"] == [1] * len(row["input_ids"])
    assert tok.decode(row["input_ids"]) == "great film"
    declared = prepare(tok, rows, task="sequence-classification", labels=["pos", "neg"])
    assert declared.label_names == ["pos", "neg"] and declared.train["labels"] == [0, 1, 0]


def test_classification_integer_labels(tmp_path: Path, tok: Any) -> None:
    path = write_jsonl(tmp_path / "l.jsonl", [{"text": f"t{i}", "label": i % 3} for i in range(6)])

    def run(**spec: Any) -> Any:
        ds = DatasetSpec.model_validate({"source": path, **spec})
        return prepare_dataset(ds, "sequence-classification", tok, seed=0)

    prepared = run()
    assert prepared.label_names == ["0", "1", "2"]
    assert prepared.train["labels"] == [0, 1, 2, 0, 1, 2]
    named = run(labels=["a", "b", "c"])
    assert named.train["labels"] == [0, 1, 2, 0, 1, 2]  # integers index dataset.labels


# -- detection ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            "chat",
        ),
        ({"instruction": "a", "output": "b"}, "alpaca"),
        ({"prompt": "a", "completion": "b"}, "completion"),
        ({"text": "a"}, "text"),
    ],
)
def test_auto_detection(tok: Any, row: dict[str, Any], fmt: str) -> None:
    prepared = prepare(tok, [row])
    assert prepared.format == fmt
    assert prepared.report.format_reason is not None
    assert prepared.report.format_reason.startswith("auto-detected: 1 of 1 records have")


def test_detection_failure_lists_fields(tmp_path: Path, tok: Any) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DatasetError) as err:
        prepare_dataset(DatasetSpec(source=path), "causal-lm", tok, seed=0)
    message = str(err.value)
    assert "no record has the fields of a known format" in message
    assert "fields found: question, answer" in message


def test_detection_majority_and_unused_fields(tmp_path: Path, tok: Any) -> None:
    rows = [{"instruction": "a", "output": f"b{i}", "id": i} for i in range(4)]
    rows.append({"prompt": "x", "completion": "y"})
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(DatasetError) as err:
        prepare_dataset(DatasetSpec(source=path), "causal-lm", tok, seed=0)
    report = err.value.report
    assert report.format == "alpaca"
    assert report.format_reason == (
        "auto-detected: 4 of 5 records have instruction + output (also seen: completion 1)"
    )
    assert "m.jsonl:5: field 'instruction' is missing (has: completion, prompt)" in str(err.value)
    assert any("ignored: id (4 records)" in n for n in report.notes)


def test_direct_backend_matches_the_tokenizer_call(
    tok: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path (tokenizers backend + char_to_token) equals tokenizer(...) + offsets."""
    from finetune_trainer.data import tokenize as tk
    from finetune_trainer.data.templates import ChatRenderer, render_alpaca, render_completion

    renderer = ChatRenderer(tok, None)
    rendered = [
        render_alpaca({"instruction": "Reverse it.", "input": "abc", "output": "cba"}),
        render_completion({"prompt": "A: ", "completion": "Paris"}),
        renderer.render(CHAT[0]),
    ]
    fast = tk.tokenize_rendered(tok, rendered, add_special_tokens=True, completion_only=True)
    monkeypatch.setattr(tk, "_rust_backend", lambda _tok: None)
    slow = tk.tokenize_rendered(tok, rendered, add_special_tokens=True, completion_only=True)
    assert fast.input_ids == slow.input_ids and fast.masks == slow.masks
    for ids, r in zip(fast.input_ids, rendered, strict=True):
        assert ids == [*tok(r.text)["input_ids"], tok.eos_token_id]


class _SlowTokenizer:
    """A tokenizer without offsets (like a Python/SentencePiece one): segment-wise path."""

    is_fast = False

    def __init__(self, fast: Any) -> None:
        self.fast = fast
        self.eos_token_id = fast.eos_token_id
        self.chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.fast.encode(text, add_special_tokens=add_special_tokens))

    def get_vocab(self) -> dict[str, int]:
        return dict(self.fast.get_vocab())


def test_tokenizer_without_offsets(tok: Any) -> None:
    prepared = prepare(_SlowTokenizer(tok), CHAT)
    ids, mask = prepared.train[0]["input_ids"], prepared.train[0]["completion_mask"]
    assert tok.decode([t for t, m in zip(ids, mask, strict=True) if m]) == (
        "Hello!<|im_end|>\nGoodbye.<|im_end|><|endoftext|>"
    )


def test_classification_truncation_retokenizes(tok: Any) -> None:
    rows = [{"text": "word " * 60, "label": "a"}, {"text": "short", "label": "b"}]
    prepared = prepare(tok, rows, task="sequence-classification", maxSeqLength=16)
    assert [len(ids) for ids in prepared.train["input_ids"]] == [16, len(tok("short")["input_ids"])]
    assert prepared.train[0]["attention_mask"] == [1] * 16
    assert prepared.stats.truncated == 1
    assert prepared.report.groups["overlong"].examples[0].origin.line == 0
