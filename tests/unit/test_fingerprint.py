"""The run fingerprint: which changes make a different run (refused on the same output) and
which do not (the run resumes or republishes)."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from finetune_trainer import fingerprint
from finetune_trainer.config import RunConfig
from hypothesis import given, settings
from hypothesis import strategies as st

BASE: dict[str, Any] = {
    "model": {"source": "/models/tiny"},
    "dataset": {"source": "/data/train.jsonl", "validation": {"splitRatio": 0.1}},
    "method": {"type": "lora"},
    "training": {"maxSteps": 4, "batchSize": 4, "learningRate": 0.01, "saveSteps": 2},
    "output": {"uri": "/out/run"},
}
TRAIN = {"input_ids": [[1, 2, 3], [4, 5]], "completion_mask": [[0, 1, 1], [0, 1]]}
EVAL = {"input_ids": [[6, 7]], "completion_mask": [[0, 1]]}


def _prepared(train: dict[str, Any] = TRAIN, labels: list[str] | None = None) -> Any:
    from datasets import Dataset

    return SimpleNamespace(
        train=Dataset.from_dict(train),
        eval=Dataset.from_dict(EVAL),
        completion_only_loss=True,
        label_names=labels,
    )


def _config(path: str, value: Any) -> RunConfig:
    doc = copy.deepcopy(BASE)
    *parents, leaf = path.split(".")
    node = doc
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return RunConfig.model_validate(doc)


# training-relevant: any other value makes a different run
RELEVANT = {
    "training.learningRate": st.floats(1e-6, 1.0).filter(lambda v: v != 0.01) | st.just("auto"),
    "training.batchSize": st.integers(1, 64).filter(lambda v: v != 4) | st.just("auto"),
    "training.gradientAccumulationSteps": st.integers(2, 64),
    "training.warmupRatio": st.floats(0.0, 0.5).filter(lambda v: v != 0.03),
    "training.scheduler": st.sampled_from(["linear", "constant", "constant_with_warmup"]),
    "training.weightDecay": st.floats(0.001, 1.0),
    "training.maxGradNorm": st.floats(0.01, 100.0).filter(lambda v: v != 1.0),
    "training.precision": st.sampled_from(["bf16", "fp16", "fp32"]),
    "training.seed": st.integers(0, 2**31 - 1).filter(lambda v: v != 42),
    "training.earlyStopping": st.builds(lambda p: {"patience": p}, st.integers(1, 100)),
    "method.type": st.sampled_from(["dora", "ia3", "prefix", "prompt", "full", "qlora"]),
    "method.lora": st.builds(lambda r: {"r": r}, st.integers(1, 1024).filter(lambda v: v != 16)),
    "model.source": st.sampled_from(["/models/other", "hf://org/model", "s3://b/m"]),
    "model.revision": st.text("abcdef0123456789", min_size=1, max_size=40),
    "model.dtype": st.sampled_from(["bfloat16", "float16", "float32"]),
    "dataset.packing": st.just(True),
}
# not training-relevant: the run's length, cadence, speed knobs, evaluation and where it goes
IRRELEVANT = {
    "training.maxSteps": st.integers(1, 10_000_000),
    "training.epochs": st.integers(1, 1000),
    "training.loggingSteps": st.integers(1, 100_000),
    "training.saveSteps": st.integers(1, 10_000_000),
    "training.saveTotalLimit": st.integers(1, 100),
    "training.evalSteps": st.integers(1, 10_000_000),
    "training.gradientCheckpointing": st.booleans(),
    "training.ligerKernel": st.booleans(),
    "evaluation.generation": st.builds(
        lambda n, m: {"examples": n, "maxNewTokens": m}, st.integers(1, 1000), st.integers(1, 4096)
    ),
    "output.uri": st.sampled_from(["/elsewhere", "s3://bucket/run", "pvc://outputs/x"]),
    "output.mergeAdapter": st.booleans(),
    "model.attention": st.sampled_from(["sdpa", "eager", "flash_attention_2", "flex_attention"]),
    "model.trustRemoteCode": st.booleans(),
    "dataset.source": st.sampled_from(["/copy/train.jsonl", "s3://b/train.jsonl"]),
    "dataset.paddingFree": st.booleans(),
}


def _field(table: dict[str, Any]) -> Any:
    return st.sampled_from(sorted(table)).flatmap(lambda k: st.tuples(st.just(k), table[k]))


@settings(max_examples=150, deadline=None)
@given(change=_field(RELEVANT))
def test_a_training_relevant_change_makes_a_different_run(change: tuple[str, Any]) -> None:
    path, value = change
    before = fingerprint.of_run(RunConfig.model_validate(BASE), _prepared())
    after = fingerprint.of_run(_config(path, value), _prepared())
    assert after.digest != before.digest
    top = path.split(".")[0]
    assert any(d.startswith(top) for d in before.differences(after)), before.differences(after)


@settings(max_examples=150, deadline=None)
@given(change=_field(IRRELEVANT))
def test_length_cadence_evaluation_and_location_keep_the_run(change: tuple[str, Any]) -> None:
    path, value = change
    before = fingerprint.of_run(RunConfig.model_validate(BASE), _prepared())
    after = fingerprint.of_run(_config(path, value), _prepared())
    assert after.digest == before.digest
    assert before.differences(after) == []


@settings(max_examples=100, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.integers(0, 50_000), min_size=1, max_size=20), min_size=1, max_size=10
    ),
    where=st.data(),
)
def test_the_training_data_content_is_part_of_the_run(rows: list[list[int]], where: Any) -> None:
    train = {"input_ids": rows, "completion_mask": [[1] * len(r) for r in rows]}
    run = RunConfig.model_validate(BASE)
    before = fingerprint.of_run(run, _prepared(train))
    i = where.draw(st.integers(0, len(rows) - 1))
    j = where.draw(st.integers(0, len(rows[i]) - 1))
    changed = copy.deepcopy(rows)
    changed[i][j] += 1
    after = fingerprint.of_run(
        run, _prepared({"input_ids": changed, "completion_mask": train["completion_mask"]})
    )
    assert before.differences(after) == ["the training examples differ"]
    # the same content: the same digest, however the rows are chunked or indexed
    from datasets import Dataset, concatenate_datasets

    whole = Dataset.from_dict(train)
    halves = concatenate_datasets([whole.select(range(i)), whole.select(range(i, len(rows)))])
    assert fingerprint.examples_digest(halves) == fingerprint.examples_digest(whole)


def test_class_labels_and_task_are_part_of_the_run() -> None:
    run = RunConfig.model_validate(BASE)
    a = fingerprint.of_run(run, _prepared(labels=["neg", "pos"]))
    b = fingerprint.of_run(run, _prepared(labels=["pos", "neg"]))
    assert a.differences(b) == ['dataset.labels ["neg", "pos"] -> ["pos", "neg"]']


def test_check_refuses_another_run_and_unfingerprinted_checkpoints(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    first = fingerprint.of_run(RunConfig.model_validate(BASE), _prepared())
    fingerprint.check(out, first, has_checkpoints=False)  # an empty output: any run
    with pytest.raises(fingerprint.DifferentRunError, match=r"holds checkpoints without a"):
        fingerprint.check(out, first, has_checkpoints=True)
    fingerprint.record(out, first)
    assert fingerprint.stored(out) == first
    fingerprint.check(out, first, has_checkpoints=True)  # the same run: resumes
    other = fingerprint.of_run(_config("training.learningRate", 0.02), _prepared())
    with pytest.raises(fingerprint.DifferentRunError) as err:
        fingerprint.check(out, other, has_checkpoints=True)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"output.uri: {out} holds a different run")
    assert "training.learningRate 0.01 -> 0.02" in message
    assert f"delete {out} to start over" in message and "another output.uri" in message
    (Path(out) / "fingerprint.json").write_text("{not json")
    with pytest.raises(fingerprint.DifferentRunError, match=r"unreadable fingerprint\.json"):
        fingerprint.check(out, first, has_checkpoints=False)


def test_a_token_budget_is_part_of_the_run_and_auto_matches_older_outputs() -> None:
    def fields(**training: Any) -> dict[str, Any]:
        doc = copy.deepcopy(BASE)
        doc["training"].update(training)
        return fingerprint.of_run(RunConfig.model_validate(doc), _prepared()).fields

    rows = fields(batchSize="auto")
    assert "training.batchTokens" not in rows  # auto: as stored before batchTokens existed
    assert fields(batchSize="auto", batchTokens=4096)["training.batchTokens"] == 4096
    assert fields(batchSize="auto", batchTokens=8192) != fields(batchSize="auto", batchTokens=4096)
