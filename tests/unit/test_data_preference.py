"""Preference data (prompt/messages + chosen + rejected): detection, the chat variant, the
prompt/answer split, every check with its 1-based line, and the length policy on pairs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer.config import DatasetSpec
from finetune_trainer.data import DatasetError, PreparedDataset, prepare_dataset

ZEPHYR = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def pair(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "prompt": f"Add {i} and 2.\nAnswer: ",
        "chosen": f"The sum is {i + 2}.",
        "rejected": f"The sum is {i + 7}.",
        **extra,
    }


def write(tmp_path: Path, rows: list[Any]) -> str:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def prepare(tok: Any, objective: str = "dpo", **spec: Any) -> PreparedDataset:
    ds = DatasetSpec.model_validate(spec)
    return prepare_dataset(ds, "causal-lm", tok, seed=0, objective=objective)  # type: ignore[arg-type]


def fail(tok: Any, objective: str = "dpo", **spec: Any) -> DatasetError:
    with pytest.raises(DatasetError) as err:
        prepare(tok, objective, **spec)
    return err.value


def lines_of(report: Any, kind: str) -> list[int]:
    return [issue.origin.line for issue in report.groups[kind].examples]


def texts(tok: Any, prepared: PreparedDataset, i: int = 0) -> tuple[str, str, str]:
    row = prepared.train[i]
    return tuple(tok.decode(row[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))  # type: ignore[return-value]


def test_plain_pairs_are_detected_and_split_at_the_answer(tok: Any) -> None:
    prepared = prepare(tok, inline=[pair(1), pair(2)])
    assert prepared.format == "preference"
    assert "auto-detected: 2 of 2 records have chosen + rejected" in prepared.report.format_reason
    assert prepared.train.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    prompt, chosen, rejected = texts(tok, prepared)
    assert prompt + chosen == "Add 1 and 2.\nAnswer: The sum is 3.<|endoftext|>"
    assert prompt + rejected == "Add 1 and 2.\nAnswer: The sum is 8.<|endoftext|>"
    assert chosen.endswith("3.<|endoftext|>") and rejected.endswith("8.<|endoftext|>")
    stats = prepared.stats.splits["train"]
    row = prepared.train[0]
    longer = len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))
    assert stats.examples == 2 and stats.max_length >= longer


def test_chat_variant_renders_the_history_with_the_template(tiny_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = ZEPHYR
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Capital of Greece?"},
    ]
    row = {"messages": history, "chosen": "Athens.", "rejected": "Rome."}
    prepared = prepare(tok, "orpo", inline=[row], format="preference")
    prompt, chosen, rejected = texts(tok, prepared)
    assert prompt == (
        "<|user|>\nHi<|endoftext|>\n<|assistant|>\nHello!<|endoftext|>\n"
        "<|user|>\nCapital of Greece?<|endoftext|>\n<|assistant|>\n"
    )
    assert chosen == "Athens.<|endoftext|>" and rejected == "Rome.<|endoftext|>"


def test_trl_conversational_layout_is_accepted(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = ZEPHYR
    row = {
        "prompt": [{"role": "user", "content": "Capital of Italy?"}],
        "chosen": [{"role": "assistant", "content": "Rome."}],
        "rejected": [{"role": "assistant", "content": "Athens."}],
    }
    prepared = prepare(tok, source=write(tmp_path, [row]))
    prompt, chosen, rejected = texts(tok, prepared)
    assert prompt == "<|user|>\nCapital of Italy?<|endoftext|>\n<|assistant|>\n"
    assert (chosen, rejected) == ("Rome.<|endoftext|>", "Athens.<|endoftext|>")


def test_every_pair_problem_with_its_line(tmp_path: Path, tok: Any) -> None:
    history = [{"role": "user", "content": "Hi"}]
    rows = [
        pair(1),  # 1
        {"prompt": "Add 2 and 2.", "chosen": "4"},  # 2 missing rejected
        {"prompt": "Add 3 and 2.", "chosen": "  ", "rejected": "6"},  # 3 empty chosen
        {"prompt": "Add 4 and 2.", "chosen": "6", "rejected": " 6 "},  # 4 identical answers
        pair(1),  # 5 duplicate of line 1 (dropped, a warning)
        {"chosen": "yes", "rejected": "no"},  # 6 no prompt
        {
            "messages": [*history, {"role": "assistant", "content": "x"}],
            "chosen": "a",
            "rejected": "b",
        },  # 7
        {"prompt": "p", "messages": history, "chosen": "a", "rejected": "b"},  # 8 both prompt kinds
        {"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},  # 9
        {"prompt": "p", "chosen": 5, "rejected": "b"},  # 10 wrong type
        pair(11),  # 11
    ]
    err = fail(tok, source=write(tmp_path, rows), format="preference")
    report = err.report
    assert lines_of(report, "missing_field") == [2, 6]
    assert lines_of(report, "empty_field") == [3]
    assert lines_of(report, "identical_answers") == [4]
    assert lines_of(report, "duplicate") == [5]
    assert lines_of(report, "bad_history") == [7]
    assert lines_of(report, "conflicting_fields") == [8]
    assert lines_of(report, "wrong_type") == [9, 10]
    assert report.groups["duplicate"].severity == "warning"
    message = str(err)
    assert f"{tmp_path / 'pairs.jsonl'}:4: chosen and rejected are the same answer" in message
    assert "field 'rejected' is missing" in message


def _long_rows() -> list[dict[str, Any]]:
    return [
        pair(1),  # 1 fits
        {"prompt": "Add 5 and 2.\nAnswer: ", "chosen": "seven " * 40, "rejected": "six"},  # 2
        {"prompt": "word " * 80, "chosen": "a", "rejected": "b"},  # 3 prompt alone too long
        {"prompt": "Q: ", "chosen": "same " * 40 + "x", "rejected": "same " * 40 + "y"},  # 4
        pair(5),  # 5 fits
    ]


def test_overlong_pairs_truncate_drop_or_fail(tmp_path: Path, tok: Any) -> None:
    source = write(tmp_path, _long_rows())
    truncated = prepare(tok, source=source, maxSeqLength=32)
    report = truncated.report
    assert lines_of(report, "overlong") == [2, 4]
    assert report.groups["overlong"].action == "truncated"
    assert lines_of(report, "prompt_too_long") == [3]
    assert lines_of(report, "identical_answers") == [4]  # the answers differ only after the cut
    assert truncated.train.num_rows == 3 and truncated.stats.truncated == 2
    for row in truncated.train:
        assert len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) <= 32

    dropped = prepare(tok, source=source, maxSeqLength=32, overlong="drop")
    assert lines_of(dropped.report, "overlong") == [2, 3, 4]
    assert dropped.train.num_rows == 2 and dropped.stats.dropped_overlong == 3

    err = fail(tok, source=source, maxSeqLength=32, overlong="error")
    assert lines_of(err.report, "overlong") == [2, 3, 4]
    assert err.report.groups["overlong"].severity == "error"


def test_objective_and_data_must_match(tmp_path: Path, tok: Any) -> None:
    alpaca = [{"instruction": "Add 1 and 2.", "output": "3"}]
    err = fail(tok, inline=alpaca)
    assert "training.objective dpo needs preference data" in str(err)
    assert "this data is alpaca" in str(err)
    err = fail(tok, objective="sft", inline=[pair(1)])
    assert "preference data (chosen + rejected) needs training.objective dpo or orpo" in str(err)


def test_generation_eval_prompts_come_from_pairs(tok: Any) -> None:
    from finetune_trainer.generation import held_out

    prepared = prepare(tok, inline=[pair(i) for i in range(10)], validation={"splitRatio": 0.2})
    held = held_out(prepared.eval, tok, 5)
    assert len(held.prompts) == 2
    assert held.prompt_texts[0].startswith("Add ") and held.prompt_texts[0].endswith("Answer: ")
    assert held.references[0].startswith("The sum is ")
