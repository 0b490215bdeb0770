"""`finetune status|list|logs|cancel` against the emulator (no operator needed)."""

from __future__ import annotations

import typer
from finetune_operator.cli import register, sparkline
from rest import core_path, custom_path
from typer.testing import CliRunner

STATUS = {
    "phase": "Running",
    "podName": "ft-abc",
    "conditions": [
        {
            "type": "Running",
            "status": "True",
            "reason": "Training",
            "message": "the trainer is training",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }
    ],
    "progress": {"step": 50, "totalSteps": 200, "percent": 25.0, "loss": 1.5, "eta": "1h05m"},
    "checkpoints": [
        {
            "step": 40,
            "uri": "pvc://out/checkpoints/checkpoint-40",
            "time": "2026-01-01T00:00:00Z",
            "evalLoss": 1.2,
            "best": True,
        }
    ],
}
SPEC = {
    "model": {"source": "hf://a/b"},
    "dataset": {"source": "s3://b/d.jsonl"},
    "output": {"uri": "s3://b/o"},
}


def app() -> typer.Typer:
    a = typer.Typer()
    register(a)
    return a


def test_status_list_logs_cancel(cluster) -> None:
    cluster.apply_ftj("ft", SPEC)
    cluster.patch(custom_path("default", "ft", "status"), {"status": STATUS})
    runner = CliRunner()

    result = runner.invoke(app(), ["status", "ft"])
    assert result.exit_code == 0, result.output
    assert "Running" in result.output and "1h05m" in result.output
    assert "checkpoint-40" in result.output

    result = runner.invoke(app(), ["list"])
    assert result.exit_code == 0, result.output
    assert "ft" in result.output and "25%" in result.output

    result = runner.invoke(app(), ["list", "-A"])
    assert "default" in result.output

    # logs: the pod named in status does not exist -> the API's 404, not a traceback;
    # then the pod's log, whole and followed
    result = runner.invoke(app(), ["logs", "ft"])
    assert result.exit_code == 1 and result.output.startswith("error: 404")
    cluster.create(
        core_path("default", "pods"),
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "ft-abc", "labels": {"finetune.dev/job": "ft"}},
        },
    )
    log_path = core_path("default", "pods", "ft-abc", "log")
    cluster.emulator[f"get {log_path}"] << b"step 1 loss 2.0\nstep 2 loss 1.5\n"
    result = runner.invoke(app(), ["logs", "ft"])
    assert result.exit_code == 0, result.output
    assert result.output == "step 1 loss 2.0\nstep 2 loss 1.5\n"
    result = runner.invoke(app(), ["logs", "ft", "-f"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["step 1 loss 2.0", "step 2 loss 1.5"]
    assert [r.params.get("container") for r in cluster.emulator[f"get {log_path}"]] == [
        "trainer",
        "trainer",
    ]

    result = runner.invoke(app(), ["status", "missing"])
    assert result.exit_code == 1 and "not found" in result.output

    result = runner.invoke(app(), ["cancel", "ft"])
    assert result.exit_code == 0, result.output
    assert cluster.ftj("ft") is None
    result = runner.invoke(app(), ["cancel", "ft"])
    assert result.exit_code == 1


def test_help_on_every_command() -> None:
    runner = CliRunner()
    for command in ("status", "list", "logs", "cancel"):
        result = runner.invoke(app(), [command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output


def test_sparkline() -> None:
    assert sparkline([3.0, 2.0, 1.0]) == "█▄▁"
    assert sparkline([]) == ""
