"""Malformed data: every problem reported with its file and 1-based line, counted, collected."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer.config import DatasetSpec
from finetune_trainer.data import DatasetError, prepare_dataset
from finetune_trainer.data.report import MAX_EXAMPLES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def ok(i: int) -> str:
    return json.dumps({"instruction": f"Task {i}", "input": "", "output": f"Answer {i}"})


def lines_of(report: Any, kind: str) -> list[int]:
    return [issue.origin.line for issue in report.groups[kind].examples]


def fail(tok: Any, path: Path, task: str = "causal-lm", **spec: Any) -> DatasetError:
    ds = DatasetSpec.model_validate({"source": str(path), **spec})
    with pytest.raises(DatasetError) as err:
        prepare_dataset(ds, task, tok, seed=0)  # type: ignore[arg-type]
    return err.value


def test_every_problem_with_its_line(tmp_path: Path, tok: Any) -> None:
    lines = [
        ok(1),  # 1
        ok(2),  # 2
        '{"instruction": "Task 3", "output": ',  # 3 bad JSON
        ok(4),  # 4
        json.dumps({"instruction": "Task 5", "input": "x"}),  # 5 missing output
        json.dumps({"instruction": "  ", "output": "Answer 6"}),  # 6 empty instruction
        json.dumps({"instruction": "Task 7", "output": 42}),  # 7 wrong type
        ok(1),  # 8 duplicate of line 1 (soft)
        "",  # 9 blank: skipped
        "[1, 2]",  # 10 not an object
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    err = fail(tok, path, format="alpaca")
    message = str(err)
    f = str(path)
    assert f"{f}:3: invalid JSON: Expecting value (column 37)" in message
    assert f"{f}:5: field 'output' is missing (has: input, instruction)" in message
    assert f"{f}:6: field 'instruction' is empty" in message
    assert f"{f}:7: field 'output' must be a string, got number" in message
    assert f"{f}:10: expected a JSON object, got array" in message
    assert "5 problems stop the run" in message
    assert "line numbers are 1-based" in message
    report = err.report
    assert report.records == 9
    assert lines_of(report, "malformed") == [3]
    assert lines_of(report, "missing_field") == [5]
    assert lines_of(report, "empty_field") == [6]
    assert lines_of(report, "wrong_type") == [7]
    # duplicates are soft (dropped, not errors) and reported with the errors all the same
    assert lines_of(report, "duplicate") == [8]
    assert report.groups["duplicate"].severity == "warning"
    handled = message.index("Also found (handled as configured, not errors):")
    assert message.index(f"{f}:8: same as {f}:1") > handled
    assert "- duplicate record (1) (dropped)" in message
    data = report.to_dict()
    json.dumps(data)
    assert data["ok"] is False
    assert {e["kind"] for e in data["errors"]} == {
        "malformed",
        "missing_field",
        "empty_field",
        "wrong_type",
        "not_an_object",
    }


def test_first_examples_and_counts(tmp_path: Path, tok: Any) -> None:
    lines = [ok(0)] + ["{oops" for _ in range(8)] + [ok(1)]
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(lines))
    err = fail(tok, path)
    group = err.report.groups["malformed"]
    assert group.count == 8
    assert [i.origin.line for i in group.examples] == list(range(2, 2 + MAX_EXAMPLES))
    assert "- malformed record (8)" in str(err)
    assert "... and 3 more" in str(err)


def test_duplicates_drop_and_keep(tmp_path: Path, tok: Any) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([ok(1), ok(2), ok(1), ok(3), ok(2)]))
    dropped = prepare_dataset(DatasetSpec(source=str(path)), "causal-lm", tok, seed=0)
    assert len(dropped.train) == 3
    assert lines_of(dropped.report, "duplicate") == [3, 5]
    assert dropped.report.groups["duplicate"].action == "dropped"
    assert str(dropped.report.groups["duplicate"].examples[0]) == f"{path}:3: same as {path}:1"
    assert dropped.stats.dropped_duplicates == 2
    kept = prepare_dataset(
        DatasetSpec(source=str(path), duplicates="keep"), "causal-lm", tok, seed=0
    )
    assert len(kept.train) == 5 and kept.report.groups["duplicate"].action == "kept"


def long_rows() -> list[str]:
    return [
        json.dumps({"prompt": "Q: hi\nA:", "completion": " short answer"}),  # 1
        json.dumps({"prompt": "Q: hi\nA:", "completion": " long " + "word " * 80}),  # 2
        json.dumps({"prompt": "Q: " + "context " * 80 + "\nA:", "completion": " ok"}),  # 3
        json.dumps({"prompt": "Q: yo\nA:", "completion": " fine"}),  # 4
    ]


@pytest.fixture
def long_file(tmp_path: Path) -> Path:
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(long_rows()) + "\n")
    return path


def test_overlong_truncate(long_file: Path, tok: Any) -> None:
    spec = DatasetSpec(source=str(long_file), maxSeqLength=32, overlong="truncate")
    prepared = prepare_dataset(spec, "causal-lm", tok, seed=0)
    report = prepared.report
    assert lines_of(report, "overlong") == [2, 3]
    assert report.groups["overlong"].action == "truncated"
    assert "tokens > maxSeqLength 32" in report.groups["overlong"].examples[0].message
    # line 3's prompt fills the window: nothing of the response is left, so it is dropped
    assert lines_of(report, "no_loss_tokens") == [3]
    assert len(prepared.train) == 3
    lengths = [len(ids) for ids in prepared.train["input_ids"]]
    assert max(lengths) == 32
    assert prepared.stats.truncated == 2 and prepared.stats.dropped_no_loss == 1
    truncated = prepared.train[1]
    assert truncated["input_ids"][-1] != tok.eos_token_id  # cut, not ended
    assert len(truncated["completion_mask"]) == 32


def test_overlong_drop(long_file: Path, tok: Any) -> None:
    spec = DatasetSpec(source=str(long_file), maxSeqLength=32, overlong="drop")
    prepared = prepare_dataset(spec, "causal-lm", tok, seed=0)
    assert lines_of(prepared.report, "overlong") == [2, 3]
    assert prepared.report.groups["overlong"].action == "dropped"
    assert len(prepared.train) == 2 and prepared.stats.dropped_overlong == 2


def test_overlong_error(long_file: Path, tok: Any) -> None:
    err = fail(tok, long_file, maxSeqLength=32, overlong="error")
    assert lines_of(err.report, "overlong") == [2, 3]
    assert f"{long_file}:2: " in str(err) and "tokens > maxSeqLength 32" in str(err)


def chat(*turns: tuple[str, Any]) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})


def test_chat_problems(tmp_path: Path, tok: Any) -> None:
    lines = [
        chat(("user", "hi"), ("assistant", "hello")),  # 1
        chat(("user", "hi"), ("user", "anyone?")),  # 2 no assistant
        chat(("human", "hi"), ("gpt", "hello")),  # 3 unknown roles
        json.dumps({"messages": "hi"}),  # 4 wrong type
        json.dumps({"messages": []}),  # 5 empty
        chat(("user", "hi"), ("assistant", "")),  # 6 empty content
        chat(("user", "hi"), ("assistant", None)),  # 7 null content
        chat(("user", "hi"), ("assistant", ["a"])),  # 8 wrong type content
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(lines))
    err = fail(tok, path)
    report, message = err.report, str(err)
    assert report.format == "chat"
    assert lines_of(report, "no_assistant") == [2]
    assert f"{path}:2: the conversation has no assistant message to learn" in message
    assert lines_of(report, "unknown_role") == [3, 3]
    assert "messages[0].role is 'human'; expected one of system, user, assistant" in message
    assert "(did you mean 'assistant'?)" in message
    assert lines_of(report, "wrong_type") == [4, 8]
    assert lines_of(report, "empty_field") == [5, 6, 7]
    assert f"{path}:6: messages[1].content is empty" in message


def test_classification_label_problems(tmp_path: Path, tok: Any) -> None:
    rows = [
        {"text": "good", "label": "pos"},  # 1
        {"text": "bad", "label": "neg"},  # 2
        {"text": "meh", "label": "neutral"},  # 3 unknown with declared labels
        {"text": "odd", "label": 1.5},  # 4 wrong type
        {"text": "", "label": "pos"},  # 5 empty text
        {"label": "pos"},  # 6 missing text
    ]
    path = tmp_path / "cls.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    err = fail(tok, path, "sequence-classification", labels=["neg", "pos"])
    report, message = err.report, str(err)
    assert lines_of(report, "unknown_label") == [3]
    assert (
        f"{path}:3: label 'neutral' is not in the label set of dataset.labels (neg, pos)" in message
    )
    assert lines_of(report, "wrong_type") == [4]
    assert "field 'label' must be a string or an integer, got number" in message
    assert lines_of(report, "empty_field") == [5]
    assert lines_of(report, "missing_field") == [6]


def test_classification_needs_two_labels(tmp_path: Path, tok: Any) -> None:
    path = tmp_path / "one.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t{i}", "label": "pos"}) for i in range(4)))
    err = fail(tok, path, "sequence-classification")
    assert "needs at least 2 labels in the training data; found only 'pos'" in str(err)


def test_missing_and_empty_sources(tmp_path: Path, tok: Any) -> None:
    err = fail(tok, tmp_path / "nope.jsonl")
    assert "nope.jsonl: not found" in str(err)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert "holds no records" in str(fail(tok, empty))
    odd = tmp_path / "data.txt"
    odd.write_text("hello")
    assert "unsupported file type" in str(fail(tok, odd))


def test_validation_source_errors_are_reported_too(tmp_path: Path, tok: Any) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(ok(i) for i in range(5)))
    val = tmp_path / "val.jsonl"
    val.write_text(ok(10) + "\n" + json.dumps({"instruction": "x"}) + "\n")
    err = fail(tok, train, validation={"source": str(val)})
    assert f"{val}:2: field 'output' is missing" in str(err)


# -- a whole file in the wrong encoding or layout: one message, not one per line ---------------
ENCODINGS = ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"]
records = st.lists(
    st.fixed_dictionaries(
        {
            "instruction": st.text(st.characters(max_codepoint=126, min_codepoint=32), min_size=1),
            "output": st.text(st.characters(max_codepoint=126, min_codepoint=32), min_size=1),
        }
    ),
    min_size=2,
    max_size=30,
)


def _render(rows: list[dict[str, str]], suffix: str) -> str:
    if suffix == ".json":
        return json.dumps(rows, indent=2)
    if suffix == ".csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=["instruction", "output"])
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    return "".join(json.dumps(r) + "\n" for r in rows)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=records,
    encoding=st.sampled_from(ENCODINGS),
    suffix=st.sampled_from([".jsonl", ".json", ".csv"]),
)
def test_a_utf16_or_utf32_file_is_one_message(
    tmp_path: Path, tok: Any, rows: list[dict[str, str]], encoding: str, suffix: str
) -> None:
    path = tmp_path / f"train{suffix}"
    path.write_bytes(_render(rows, suffix).encode(encoding))
    err = fail(tok, path)
    assert list(err.report.groups) == ["encoding"], err.report.groups
    (issue,) = err.report.groups["encoding"].examples
    assert issue.message.startswith(f"{path}: this file ")
    assert f"{encoding[:6].upper()}" in issue.message and "save it as UTF-8" in issue.message


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (gzip.compress(b'{"text": "x"}\n'), "gzip-compressed file; give it a .gz suffix"),
        (bytes(range(256)) * 8, "binary file, not text"),
        (b"PAR1" + bytes(100), "Parquet file; give it a .parquet suffix"),
    ],
)
def test_a_binary_file_is_one_message(tmp_path: Path, tok: Any, content: bytes, says: str) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    err = fail(tok, path)
    assert [(g.kind, g.count) for g in err.report.groups.values()] == [("encoding", 1)]
    assert f"{path}: this is a {says}" in str(err)


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_array_saved_as_jsonl_is_one_message(
    tmp_path: Path, tok: Any, indent: int | None
) -> None:
    rows = [{"instruction": f"Task {i}", "output": f"Answer {i}"} for i in range(20)]
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(rows, indent=indent))
    err = fail(tok, path)
    assert [(g.kind, g.count) for g in err.report.groups.values()] == [("layout", 1)]
    assert (
        f"{path}: this is a JSON array, not JSON lines; name the file .json or write one object "
        "per line" in str(err)
    )


def test_a_compressed_file_that_is_not_is_a_dataset_error(tmp_path: Path, tok: Any) -> None:
    path = tmp_path / "train.jsonl.gz"
    path.write_text(ok(1) + "\n")
    assert f"{path}: cannot decompress" in str(fail(tok, path))
    junk = tmp_path / "train.parquet"
    junk.write_bytes(b"not parquet at all" * 10)
    assert f"{junk}: not a readable Parquet file" in str(fail(tok, junk))


def test_every_problem_class_is_reported_at_once_with_counts(tmp_path: Path, tok: Any) -> None:
    lines = (
        [ok(i) for i in range(12)]
        + ["{bad"] * 3
        + [ok(0), ok(1)]
        + [json.dumps({"instruction": "x"})] * 2
    )
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    message = str(fail(tok, path, format="alpaca"))
    assert "- malformed record (3)" in message
    assert "- missing field (2)" in message
    assert "- duplicate record (2) (dropped)" in message
    assert f"{path}:16: same as {path}:1" in message and f"{path}:17: same as {path}:2" in message
