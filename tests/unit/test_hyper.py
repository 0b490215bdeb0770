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


def test_gpu_batch_is_probed_and_checkpointing_for_large_models() -> None:
    r = hyper.resolve(_run(), 100, "cuda", model_params=8_000_000_000)
    assert r.batch_size is None
    assert r.gradient_checkpointing is True
    assert (
        hyper.resolve(_run(), 100, "cuda", model_params=500_000_000).gradient_checkpointing is False
    )
