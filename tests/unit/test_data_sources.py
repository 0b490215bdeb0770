"""Reading sources: JSONL, JSON arrays, CSV/TSV, Parquet, compressed, directories, pvc://, hf://,
inline records, each record keeping its file and line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer.config import DatasetSpec
from finetune_trainer.data import DatasetError, load_records, prepare_dataset
from finetune_trainer.data.loading import parse_hf_uri


def test_jsonl_bom_crlf_and_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"text": "one"}\r\n\r\n{"text": "caf\xe9"}\r\n{"text": "three"}\r\n'
    )
    raw = load_records(DatasetSpec(source=str(path)))
    assert raw.records == [{"text": "one"}, {"text": "three"}]
    assert [o.line for o in raw.origins] == [1, 4]
    assert [(i.origin.line, i.message) for i in raw.errors] == [(3, "not valid UTF-8 at byte 13")]


def test_json_array_keeps_line_numbers(tmp_path: Path) -> None:
    rows = [{"text": "a"}, {"text": "b\nstill b"}, {"text": "c"}]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows, indent=2))
    raw = load_records(DatasetSpec(source=str(path)))
    assert raw.records == rows
    assert [str(o) for o in raw.origins] == [f"{path}:2", f"{path}:5", f"{path}:8"]


def test_json_array_syntax_error_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
    raw = load_records(DatasetSpec(source=str(path)))
    assert raw.records == [{"text": "a"}]
    assert raw.errors[0].origin.line == 3
    assert "rest of the array cannot be read" in raw.errors[0].message


def test_json_file_holding_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "lines.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert len(load_records(DatasetSpec(source=str(path)))) == 2


def test_csv_line_numbers_with_multiline_cells(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text(
        'instruction,input,output\nSay hi,,Hi!\n"Write\ntwo lines",,"a\nb"\nbroken,row\nLast,,ok\n'
    )
    raw = load_records(DatasetSpec(source=str(path)))
    assert raw.records == [
        {"instruction": "Say hi", "output": "Hi!"},
        {"instruction": "Write\ntwo lines", "output": "a\nb"},
        {"instruction": "Last", "output": "ok"},
    ]
    assert [o.line for o in raw.origins] == [2, 3, 7]
    assert [(i.origin.line, i.message) for i in raw.errors] == [
        (6, "row has 2 fields, the header has 3")
    ]


def test_tsv_and_gzip(tmp_path: Path) -> None:
    path = tmp_path / "d.tsv.gz"
    path.write_bytes(gzip.compress(b"text\tlabel\ngood\tpos\nbad\tneg\n"))
    raw = load_records(DatasetSpec(source=str(path)))
    assert raw.records == [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]


def test_parquet_rows(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "completion": ["x", "y"]}), path)
    raw = load_records(DatasetSpec(source=str(path)))
    assert raw.records[1] == {"prompt": "b", "completion": "y"}
    assert str(raw.origins[1]) == f"{path} row 2"


def test_directory_of_files(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "b.jsonl").write_text('{"text": "b"}\n')
    (tmp_path / "data" / "a.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "data" / "README.md").write_text("ignored")
    raw = load_records(DatasetSpec(source=str(tmp_path / "data")))
    assert raw.records == [{"text": "a"}, {"text": "b"}]
    assert raw.origins[1].file.endswith("b.jsonl")


def test_pvc_and_file_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_PVC_ROOT", str(tmp_path))
    (tmp_path / "datasets" / "v1").mkdir(parents=True)
    path = tmp_path / "datasets" / "v1" / "train.jsonl"
    path.write_text('{"text": "a"}\n{bad\n')
    raw = load_records(DatasetSpec(source="pvc://datasets/v1/train.jsonl"))
    assert raw.records == [{"text": "a"}]
    assert str(raw.errors[0].origin) == "pvc://datasets/v1/train.jsonl:2"
    assert len(load_records(DatasetSpec(source=f"file://{path}"))) == 1
    with pytest.raises(DatasetError, match=r"resolved to .*datasets/v1/missing\.jsonl"):
        load_records(DatasetSpec(source="pvc://datasets/v1/missing.jsonl"))


def test_inline_records_origin() -> None:
    spec = DatasetSpec.model_validate(
        {"inline": [{"text": "a"}, {"messages": [{"role": "user", "content": "hi"}]}]}
    )
    raw = load_records(spec)
    assert raw.records == [{"text": "a"}, {"messages": [{"role": "user", "content": "hi"}]}]
    assert [str(o) for o in raw.origins] == ["dataset.inline[0]", "dataset.inline[1]"]


def test_inline_error_names_the_index(tiny_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    spec = DatasetSpec.model_validate(
        {"inline": [{"instruction": "a", "output": "b"}, {"instruction": "c"}], "format": "alpaca"}
    )
    with pytest.raises(DatasetError, match=r"dataset.inline\[1\]: field 'output' is missing"):
        prepare_dataset(spec, "causal-lm", tok, seed=0)


@pytest.mark.parametrize(
    ("uri", "parsed"),
    [
        ("hf://datasets/org/name", ("org/name", None, "train", None)),
        ("hf://datasets/org/name/validation", ("org/name", None, "validation", None)),
        ("hf://datasets/org/name/cfg/test[:10%]", ("org/name", "cfg", "test[:10%]", None)),
        (
            "hf://datasets/org/name/data/train.jsonl",
            ("org/name", None, "train", "data/train.jsonl"),
        ),
    ],
)
def test_parse_hf_uri(uri: str, parsed: tuple[Any, ...]) -> None:
    assert parse_hf_uri(uri) == parsed


def test_hf_uri_must_name_a_dataset() -> None:
    with pytest.raises(DatasetError, match="hf://datasets/ORG/NAME"):
        load_records(DatasetSpec(source="hf://org/name"))


def test_hf_dataset_through_datasets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_tokenizer_dir: Path
) -> None:
    """hf://datasets/... goes through datasets.load_dataset with HF_TOKEN; only the Hub download
    is replaced by the same dataset in a local folder (ClassLabel names survive)."""
    import datasets
    from transformers import AutoTokenizer

    repo = tmp_path / "repo"
    repo.mkdir()
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    datasets.Dataset.from_dict(
        {"text": ["good", "bad", "great", "awful"], "label": [1, 0, 1, 0]}, features=features
    ).to_parquet(str(repo / "train.parquet"))
    real = datasets.load_dataset
    calls: list[tuple[Any, ...]] = []

    def from_local_copy(path: str, name: Any = None, **kwargs: Any) -> Any:
        calls.append((path, name, kwargs.pop("token"), kwargs["split"]))
        return real(str(repo), name, cache_dir=str(tmp_path / "cache"), **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", from_local_copy)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    raw = load_records(DatasetSpec(source="hf://datasets/acme/reviews"))
    assert calls == [("acme/reviews", None, "hf_secret", "train")]
    assert raw.label_names == ["neg", "pos"]
    assert raw.records[0] == {"text": "good", "label": "pos"}
    assert str(raw.origins[3]) == "hf://datasets/acme/reviews row 4"
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    prepared = prepare_dataset(
        DatasetSpec(source="hf://datasets/acme/reviews"), "sequence-classification", tok, seed=0
    )
    assert prepared.label_names == ["neg", "pos"]
    assert prepared.train["labels"] == [1, 0, 1, 0]
