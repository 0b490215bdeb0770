"""QLoRA / 8-bit loading on a CUDA GPU (bitsandbytes): opt-in with --gpu."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer.config import RunConfig
from finetune_trainer.progress import Outcome
from finetune_trainer.reporting import run_reported
from finetune_trainer.runner import RunContext

pytestmark = pytest.mark.gpu

DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "instructions.jsonl"


def _run(model_dir: Path, out: Path, quantization: dict[str, Any]) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {"source": str(model_dir)},
            "dataset": {
                "source": str(DATA),
                "format": "alpaca",
                "maxSeqLength": 256,
                "validation": {"splitRatio": 0.1},
            },
            "method": {"type": "qlora", "quantization": quantization},
            "training": {"maxSteps": 6, "batchSize": 8, "learningRate": 0.005, "saveSteps": 3},
            "output": {"uri": str(out)},
        }
    )


@pytest.mark.parametrize(
    "quantization",
    [
        {"bits": 4, "quantType": "nf4", "doubleQuant": True},
        {"bits": 4, "quantType": "fp4", "doubleQuant": False, "computeDtype": "float16"},
        {"bits": 8},
    ],
    ids=["nf4-double", "fp4-fp16", "int8"],
)
def test_qlora_trains_on_a_quantized_base(
    quantization: dict[str, Any], tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert torch.cuda.is_available()
    out = tmp_path / "out"
    summary = run_reported(
        _run(tiny_model_dir, out, quantization), RunContext(name="q"), progress_port=None
    )
    assert summary.outcome == Outcome.SUCCEEDED, summary.message
    assert summary.steps == 6
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_loss"] < metrics["baseline_eval_loss"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).cuda()
    model = PeftModel.from_pretrained(base, out / "adapter")
    logits = model(input_ids=torch.tensor([[5, 6, 7]], device="cuda")).logits
    assert torch.isfinite(logits).all()


def test_quantized_base_really_is_kbit(tiny_model_dir: Path) -> None:
    import bitsandbytes as bnb
    import torch
    from finetune_trainer.models import LocalModel, load_model

    run = _run(tiny_model_dir, Path("unused"), {"bits": 4})
    model = load_model(LocalModel(tiny_model_dir), run, dtype=torch.bfloat16)
    kinds = {type(m) for m in model.modules()}
    assert bnb.nn.Linear4bit in kinds


def test_auto_batch_size_is_probed_on_gpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    run = _run(tiny_model_dir, tmp_path / "out", {"bits": 4}).model_copy(deep=True)
    run.training.batch_size = "auto"
    ctx = RunContext(name="auto")
    summary = run_reported(run, ctx, progress_port=None)
    assert summary.outcome == Outcome.SUCCEEDED, summary.message
    state = json.loads(
        (tmp_path / "out" / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text()
    )
    # a 2-layer model at 256 tokens fits the probe's starting batch (64, capped by the data)
    assert state["train_batch_size"] == 64
