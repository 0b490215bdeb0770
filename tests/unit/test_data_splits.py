"""Splits (seeded, disjoint, never empty) and token statistics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer.config import DatasetSpec
from finetune_trainer.data import DatasetError, prepare_dataset


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": f"Q{i}: ", "completion": f"answer number {i}"} for i in range(100)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def texts(tok: Any, dataset: Any) -> list[str]:
    return [tok.decode(ids) for ids in dataset["input_ids"]]


def run(tok: Any, path: Path, seed: int = 0, **spec: Any) -> Any:
    return prepare_dataset(
        DatasetSpec.model_validate({"source": str(path), **spec}), "causal-lm", tok, seed=seed
    )


def test_ratio_split_seeded_and_disjoint(tok: Any, data: Path) -> None:
    spec = {"validation": {"splitRatio": 0.1}, "test": {"splitRatio": 0.2}}
    a = run(tok, data, seed=1, **spec)
    b = run(tok, data, seed=1, **spec)
    c = run(tok, data, seed=2, **spec)
    assert (len(a.train), len(a.eval), len(a.test)) == (70, 10, 20)
    train, val, test = set(texts(tok, a.train)), set(texts(tok, a.eval)), set(texts(tok, a.test))
    assert len(train | val | test) == 100
    assert not (train & val or train & test or val & test)
    assert texts(tok, a.eval) == texts(tok, b.eval) and texts(tok, a.test) == texts(tok, b.test)
    assert texts(tok, a.eval) != texts(tok, c.eval)
    assert [s.examples for s in a.stats.splits.values()] == [70, 10, 20]
    assert list(a.stats.splits) == ["train", "validation", "test"]


def test_split_sources(tok: Any, data: Path, tmp_path: Path) -> None:
    val = tmp_path / "val.jsonl"
    val.write_text(
        json.dumps({"prompt": "Q0: ", "completion": "answer number 0"})  # also in train
        + "\n"
        + json.dumps({"prompt": "V: ", "completion": "held out"})
        + "\n"
    )
    prepared = run(tok, data, validation={"source": str(val)}, test={"splitRatio": 0.1})
    assert (len(prepared.train), len(prepared.eval), len(prepared.test)) == (90, 2, 10)
    assert any(
        "1 validation records also appear in the training data" in w and f"{val}:1 = {data}:1" in w
        for w in prepared.report.warnings
    )


def test_no_split_configured(tok: Any, data: Path) -> None:
    prepared = run(tok, data)
    assert len(prepared.train) == 100 and prepared.eval is None and prepared.test is None


def test_empty_split_is_a_clear_error(tok: Any, tmp_path: Path) -> None:
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(4)))
    with pytest.raises(DatasetError) as err:
        run(tok, path, validation={"splitRatio": 0.1})
    assert (
        "dataset.validation.splitRatio: 0.1 of 4 usable examples is 0 examples; use a larger "
        "ratio, at least 6 examples, or a validation source"
    ) in str(err.value)


def test_train_split_never_empty(tok: Any, tmp_path: Path) -> None:
    path = tmp_path / "two.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(DatasetError, match="leave no training example"):
        run(tok, path, validation={"splitRatio": 0.5}, test={"splitRatio": 0.5})


def test_token_stats(tok: Any, data: Path) -> None:
    prepared = run(tok, data, validation={"splitRatio": 0.2})
    stats = prepared.stats
    lengths = [len(ids) for ids in prepared.train["input_ids"]]
    losses = [sum(m) for m in prepared.train["completion_mask"]]
    assert stats.train.examples == 80
    assert stats.train.tokens == sum(lengths)
    assert stats.train.loss_tokens == sum(losses) < stats.train.tokens
    assert stats.train.max_length == max(lengths)
    assert stats.train.mean_length == round(sum(lengths) / 80, 1)
    assert prepared.estimated_trained_tokens(3) == 3 * sum(lengths)
    assert prepared.estimated_trained_tokens(1.5) == round(1.5 * sum(lengths))
    as_dict = prepared.report.to_dict()
    json.dumps(as_dict)
    assert as_dict["stats"]["splits"]["train"]["tokens"] == sum(lengths)
    assert any("80 examples" in line for line in stats.render_lines())


def test_classification_split_label_counts(tok: Any, tmp_path: Path) -> None:
    path = tmp_path / "cls.jsonl"
    rows = [{"text": f"review {i}", "label": "pos" if i % 2 else "neg"} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = DatasetSpec(source=str(path), validation={"splitRatio": 0.25})  # type: ignore[arg-type]
    prepared = prepare_dataset(spec, "sequence-classification", tok, seed=3)
    counts = prepared.stats.label_counts
    assert sum(counts["train"].values()) == 30 and sum(counts["validation"].values()) == 10
    assert set(prepared.eval["labels"]) <= {0, 1}
    assert prepared.stats.train.loss_tokens == 0


# --------------------------------------------------------------------------------------------
# dataset.mix: other sources mixed into training only
# --------------------------------------------------------------------------------------------
@pytest.fixture
def general(tmp_path: Path) -> Path:
    path = tmp_path / "general.jsonl"
    rows = [{"prompt": f"G{i}: ", "completion": f"general reply {i}"} for i in range(50)]
    rows.append({"prompt": "Q3: ", "completion": "answer number 3"})  # also in the task data
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mix_adds_a_seeded_fraction_to_training_only(tok: Any, data: Path, general: Path) -> None:
    spec = {"validation": {"splitRatio": 0.2}, "mix": [{"source": str(general), "fraction": 0.25}]}
    a, b = run(tok, data, seed=1, **spec), run(tok, data, seed=1, **spec)
    assert (len(a.train), len(a.eval)) == (80 + 20, 20)
    mixed = [t for t in texts(tok, a.train) if "general reply" in t]
    assert len(mixed) == 20
    assert mixed == [t for t in texts(tok, b.train) if "general reply" in t]
    assert not any("general reply" in t for t in texts(tok, a.eval))
    assert a.stats.splits["train"].examples == 100
    assert any("20 records of" in n and "mixed in" in n for n in a.report.notes)
    assert any("1 records of" in n and "already in" in n for n in a.report.notes)


def test_mix_asking_for_more_than_the_source_has_uses_all_and_warns(
    tok: Any, data: Path, general: Path
) -> None:
    prepared = run(tok, data, mix=[{"source": str(general), "fraction": 2.0}])
    assert len(prepared.train) == 100 + 50  # 51 records, one already in the task data
    assert any(
        "200 records asked for" in w and "has 50 usable" in w for w in prepared.report.warnings
    )


def test_a_bad_mix_record_is_named_by_file_and_line(tok: Any, data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad-general.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n{oops\n")
    with pytest.raises(DatasetError) as info:
        run(tok, data, mix=[{"source": str(bad), "fraction": 0.1}])
    assert f"{bad}:2" in str(info.value)


def test_mix_records_must_have_the_dataset_format(tok: Any, data: Path, tmp_path: Path) -> None:
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DatasetError) as info:
        run(tok, data, format="completion", mix=[{"source": str(chat), "fraction": 0.1}])
    assert f"{chat}:1" in str(info.value)
