"""`auto` hyperparameter rules."""

from __future__ import annotations

import pytest
from finetune_trainer import hyper
from finetune_trainer.config import RunConfig


def _run(**training: object) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {"source": "./m"},
            "dataset": {"source": "d.jsonl"},
            "method": {"type": "qlora"},
            "training": training,
            "output": {"uri": "out"},
        }
    )


@pytest.mark.parametrize(("n", "epochs"), [(50, 3), (9_999, 3), (10_000, 2), (250_000, 1)])
def test_auto_epochs(n: int, epochs: int) -> None:
    assert hyper.auto_epochs(n) == epochs
    assert hyper.resolve(_run(), n, "cpu").epochs == epochs


def test_auto_values_on_cpu() -> None:
    r = hyper.resolve(_run(), 100, "cpu")
    assert r.learning_rate == 2e-4
    assert r.batch_size == hyper.CPU_AUTO_BATCH
    assert r.precision == "fp32"
    assert r.gradient_checkpointing is False
    assert hyper.resolve(_run(), 3, "cpu").batch_size == 3


def test_explicit_values_win() -> None:
    r = hyper.resolve(
        _run(
            epochs=5, learningRate=1e-3, batchSize=2, precision="bf16", gradientCheckpointing=True
        ),
        100,
        "cpu",
    )
    assert (r.epochs, r.learning_rate, r.batch_size, r.precision, r.gradient_checkpointing) == (
        5.0,
        1e-3,
        2,
        "bf16",
        True,
    )


def test_gpu_batch_is_probed_from_the_estimate_and_checkpointing_follows_it() -> None:
    from finetune_trainer.planning.memory import MemoryEstimate
    from finetune_trainer.planning.plan import Resolved as Planned
    from finetune_trainer.strategy import Strategy

    def planned(batch: int, checkpointing: bool) -> Planned:
        return Planned(batch, checkpointing, Strategy("single"), MemoryEstimate({}, 0, 1, 0), True)

    r = hyper.resolve(_run(), 100, "cuda", planned(16, True))
    assert r.batch_size is None  # probed once the model is loaded, from the estimate's batch
    assert r.probe_start == 16
    assert r.gradient_checkpointing is True
    assert hyper.resolve(_run(), 100, "cuda", planned(16, False)).gradient_checkpointing is False
    # without an estimate (or on CPU) auto never recomputes
    assert hyper.resolve(_run(), 100, "cuda").gradient_checkpointing is False
    assert hyper.resolve(_run(), 100, "cpu", planned(16, True)).gradient_checkpointing is False


def _lm(method: str = "lora", **dataset: object) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {"source": "./m"},
            "dataset": {"source": "d.jsonl", **dataset},
            "method": {"type": method},
            "output": {"uri": "out"},
        }
    )


@pytest.mark.parametrize(
    ("run", "parallel", "batch", "flat"),
    [
        (_lm(), False, 8, True),
        (_lm(), True, 8, False),  # DataParallel splits rows: one row would all go to GPU 0
        (_lm(), False, 1, False),  # one example per batch: no padding to remove
        (_lm(paddingFree=True), True, 8, True),  # explicit wins (the trainer logs a warning)
        (_lm(paddingFree=True), False, 1, True),
        (_lm(packing=True), True, 1, True),
        (_lm("prefix"), False, 8, False),
    ],
    ids=[
        "auto",
        "auto-data-parallel",
        "auto-batch-1",
        "explicit",
        "explicit-batch-1",
        "packing",
        "prefix",
    ],
)
def test_padding_free_auto(run: RunConfig, parallel: bool, batch: int, flat: bool) -> None:
    from finetune_trainer.runner import padding_free

    assert padding_free(run, parallel, batch) is flat


@pytest.mark.parametrize(
    ("gpus", "kbit", "expected"), [(1, False, False), (2, False, True), (2, True, False)]
)
def test_data_parallel_needs_several_gpus_and_a_model_that_is_not_kbit(
    monkeypatch: pytest.MonkeyPatch, gpus: int, kbit: bool, expected: bool
) -> None:
    import torch
    from finetune_trainer.runner import data_parallel

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    model = torch.nn.Linear(2, 2)
    model.is_loaded_in_4bit = kbit  # type: ignore[assignment]
    assert data_parallel(model) is expected
