"""A stand-in trainer that honours the trainer contract (docs/contract.md), fast.

Reads the run config from $FINETUNE_CONFIG, checks that every `source` it names exists
(pvc:// resolved under $FINETUNE_PVC_ROOT, where only the mounted claims are), serves
GET /progress on $FINETUNE_PROGRESS_PORT, "trains" FAKE_STEPS steps of FAKE_STEP_SECONDS each,
writes checkpoints under the output, resumes from the last one, writes a Summary to
$FINETUNE_TERMINATION_MESSAGE_PATH and exits with the contract's exit codes (the env names and
codes are the constants of finetune_trainer.progress):

    FAKE_OUTCOME=succeeded (default) | invalid (exit 65) | crash (exit 1)
    a missing source -> exit 65 naming it
    SIGTERM -> checkpoint saved, exit 75 (preempted)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from finetune_trainer.progress import (
    ENV_CONFIG,
    ENV_PROGRESS_PORT,
    ENV_PVC_ROOT,
    ENV_TERMINATION_PATH,
    PROGRESS_PATH,
    CheckpointInfo,
    ExitCode,
    Outcome,
    Phase,
    Progress,
    Summary,
    utcnow,
)

STATE: dict[str, Any] = {"progress": Progress()}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path != PROGRESS_PATH:
            self.send_error(404)
            return
        body = STATE["progress"].to_json().encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def resolve(uri: str) -> Path:
    if uri.startswith("pvc://"):
        return Path(os.environ[ENV_PVC_ROOT]) / uri.removeprefix("pvc://")
    return Path(uri)


def finish(summary: Summary, code: int) -> None:
    Path(os.environ[ENV_TERMINATION_PATH]).write_text(summary.to_termination_message())
    sys.stdout.flush()
    os._exit(code)


def sources(config: Any, path: str = "") -> list[tuple[str, str]]:
    """(field path, URI) of every `source` in the run config, nested ones included."""
    found = []
    if isinstance(config, dict):
        for key, value in config.items():
            where = f"{path}.{key}" if path else key
            if key == "source" and isinstance(value, str):
                found.append((where, value))
            else:
                found.extend(sources(value, where))
    elif isinstance(config, list):
        for i, item in enumerate(config):
            found.extend(sources(item, f"{path}[{i}]"))
    return found


def check_sources(config: dict[str, Any]) -> None:
    """Exit 65 naming the first pvc:// source that is not there (e.g. its claim not mounted)."""
    for where, uri in sources(config):
        if uri.startswith("pvc://") and not resolve(uri).exists():
            finish(
                Summary(
                    outcome=Outcome.INVALID_INPUT,
                    reason="MissingSource",
                    message=f"{where}: {uri} not found (is its claim mounted?)",
                ),
                ExitCode.INVALID_INPUT,
            )


def main() -> None:
    config = json.loads(Path(os.environ[ENV_CONFIG]).read_text())
    check_sources(config)
    out_uri = config["output"]["uri"]
    out_dir = resolve(out_uri)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = int(os.environ.get("FAKE_STEPS", "10"))
    step_seconds = float(os.environ.get("FAKE_STEP_SECONDS", "0.2"))
    outcome = os.environ.get("FAKE_OUTCOME", "succeeded")

    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ[ENV_PROGRESS_PORT])), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    STATE["progress"] = Progress(phase=Phase.VALIDATING_DATA, total_steps=steps)
    time.sleep(step_seconds)
    if outcome == "invalid":
        message = (
            "dataset.source: 2 malformed lines: line 3: invalid JSON; line 7: missing 'output'"
        )
        finish(
            Summary(outcome=Outcome.INVALID_INPUT, reason="InvalidDataset", message=message),
            ExitCode.INVALID_INPUT,
        )

    ckpt_dir = out_dir / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    done = sorted(int(p.name.split("-")[1]) for p in ckpt_dir.glob("checkpoint-*"))
    start = done[-1] if done else 0
    checkpoints = [
        CheckpointInfo(step=s, uri=f"{out_uri}/checkpoints/checkpoint-{s}", time=utcnow())
        for s in done
    ]
    current = {"step": start}

    def on_sigterm(*_: Any) -> None:
        step = current["step"]
        (ckpt_dir / f"checkpoint-{step}").mkdir(exist_ok=True)
        ckpt = CheckpointInfo(
            step=step, uri=f"{out_uri}/checkpoints/checkpoint-{step}", time=utcnow()
        )
        finish(
            Summary(outcome=Outcome.PREEMPTED, last_checkpoint=ckpt, steps=step),
            ExitCode.PREEMPTED,
        )

    signal.signal(signal.SIGTERM, on_sigterm)
    for step in range(start + 1, steps + 1):
        time.sleep(step_seconds)
        current["step"] = step
        if step % 5 == 0:
            (ckpt_dir / f"checkpoint-{step}").mkdir(exist_ok=True)
            checkpoints.append(
                CheckpointInfo(
                    step=step,
                    uri=f"{out_uri}/checkpoints/checkpoint-{step}",
                    eval_loss=2.0 / step,
                    time=utcnow(),
                )
            )
        STATE["progress"] = Progress(
            phase=Phase.TRAINING,
            step=step,
            total_steps=steps,
            epoch=step / steps,
            loss=3.0 / step,
            learning_rate=1e-3,
            tokens_per_second=1234.5,
            eta_seconds=(steps - step) * step_seconds,
            trained_tokens=step * 100,
            checkpoints=list(checkpoints),
        )
        if outcome == "crash" and step == steps // 2:
            finish(
                Summary(outcome=Outcome.FAILED, reason="RuntimeError", message="CUDA error: boom"),
                ExitCode.FAILED,
            )

    adapter = out_dir / "adapter"
    adapter.mkdir(exist_ok=True)
    (adapter / "adapter_config.json").write_text("{}")
    finish(
        Summary(
            outcome=Outcome.SUCCEEDED,
            adapter_uri=f"{out_uri}/adapter",
            output_uri=out_uri,
            metrics={"evalLoss": 0.5, "perplexity": 1.65},
            trainable_params=1234,
            trained_tokens=steps * 100,
            steps=steps,
            last_checkpoint=checkpoints[-1] if checkpoints else None,
        ),
        ExitCode.SUCCEEDED,
    )


if __name__ == "__main__":
    main()
