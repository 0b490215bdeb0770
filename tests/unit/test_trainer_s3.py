"""A run whose model comes from and whose outputs go to S3 (moto server on loopback)."""

from __future__ import annotations

import json
from pathlib import Path

from finetune_trainer import storage
from finetune_trainer.config import RunConfig
from finetune_trainer.progress import Outcome
from finetune_trainer.reporting import run_reported
from finetune_trainer.runner import RunContext

DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "instructions.jsonl"


def _run(model_uri: str, out_uri: str, max_steps: int) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {"source": model_uri},
            "dataset": {
                "source": str(DATA),
                "format": "alpaca",
                "maxSeqLength": 256,
                "validation": {"splitRatio": 0.1},
            },
            "training": {
                "maxSteps": max_steps,
                "batchSize": 4,
                "saveSteps": 2,
                "saveTotalLimit": 1,
                "learningRate": 0.01,
            },
            "evaluation": {"generation": {"examples": 2, "maxNewTokens": 4}},
            "output": {"uri": out_uri},
        }
    )


def test_s3_model_in_outputs_and_checkpoints_out_then_resume_from_s3(
    s3: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import s3fs

    storage.upload(tiny_model_dir, f"{s3}/models/tiny")
    out = f"{s3}/runs/r1"
    first = run_reported(
        _run(f"{s3}/models/tiny", out, 4),
        RunContext(name="r1", scratch=tmp_path / "scratch1"),
        progress_port=None,
    )
    assert first.outcome == Outcome.SUCCEEDED, first.message
    assert first.adapter_uri == f"{out}/adapter"
    files = storage.list_files(out)
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "metrics.json",
        "history.jsonl",
        "loss.png",
        "README.md",
        "samples.jsonl",
    ):
        assert f"{out}/{name}" in files
    # saveTotalLimit 1: only the newest complete checkpoint stays on S3, with its marker
    ckpts = sorted(
        {f.split("/checkpoints/")[1].split("/")[0] for f in files if "/checkpoints/" in f}
    )
    assert ckpts == ["checkpoint-4"]
    assert f"{out}/checkpoints/checkpoint-4/.finetune-complete.json" in files
    # the run's fingerprint is stored with the checkpoints; its lock is released
    assert f"{out}/fingerprint.json" in files and f"{out}/.finetune.lock" not in files

    # another config on the same S3 output is refused, the output left as it was
    changed = _run(f"{s3}/models/tiny", out, 4).model_copy(deep=True)
    changed.training.learning_rate = 0.02
    refused = run_reported(
        changed, RunContext(name="r1", scratch=tmp_path / "scratch0"), progress_port=None
    )
    assert refused.outcome == Outcome.INVALID_INPUT
    assert "training.learningRate 0.01 -> 0.02" in (refused.message or "")
    assert storage.list_files(out) == files

    # a new pod (fresh scratch) resumes from the S3 checkpoint and continues to step 6
    second = run_reported(
        _run(f"{s3}/models/tiny", out, 6),
        RunContext(name="r1", scratch=tmp_path / "scratch2"),
        progress_port=None,
    )
    assert second.outcome == Outcome.SUCCEEDED, second.message
    assert second.steps == 6
    fs = s3fs.S3FileSystem(endpoint_url=storage.s3_endpoint())
    metrics = json.loads(fs.cat_file(f"{out.removeprefix('s3://')}/metrics.json"))
    assert metrics["steps"] == 6
    # trained tokens count the whole run across attempts (restored from the checkpoint)
    assert first.trained_tokens is not None
    assert first.trained_tokens < metrics["trained_tokens"] < 2 * first.trained_tokens
