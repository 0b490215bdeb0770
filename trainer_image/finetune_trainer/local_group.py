"""`finetune run --nproc-per-node N`: the same run as a pod's, with N workers on this machine
(GPUs, or CPU processes with gloo), through the same launcher (`finetune_trainer.launch`).

The run config goes to the workers as a file, their logs to `<output>/logs/` (this terminal
keeps the progress bar), and the bar follows rank 0's /progress, as the operator does.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path

from finetune_trainer.config import RunConfig
from finetune_trainer.launch import Group, launch, worker_command
from finetune_trainer.progress import (
    ENV_CONFIG,
    ENV_MASTER_PORT,
    ENV_NPROC_PER_NODE,
    ENV_PROGRESS_PORT,
    PROGRESS_PATH,
    Progress,
    Summary,
)

ENV_JOB_NAME = "FINETUNE_JOB_NAME"
POLL_SECONDS = 0.5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _follow(port: int, report: Callable[[Progress], None], stop: threading.Event) -> None:
    """Feed `report` with rank 0's /progress until `stop` (nothing while it is not up)."""
    url = f"http://127.0.0.1:{port}{PROGRESS_PATH}"
    while not stop.wait(POLL_SECONDS):
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                report(Progress.model_validate_json(response.read()))
        except (OSError, ValueError):
            continue  # not serving yet, or between phases


def run_group(
    name: str,
    run: RunConfig,
    nproc_per_node: int,
    log_dir: Path,
    report: Callable[[Progress], None],
    progress_port: int | None = None,
) -> Summary:
    """Run `run` with `nproc_per_node` workers here; return the merged summary (the workers'
    output is in `log_dir`, one file per rank)."""
    port = progress_port or _free_port()
    with tempfile.TemporaryDirectory(prefix="finetune-run-") as tmp:
        config = Path(tmp) / "config.json"
        config.write_text(run.model_dump_json(by_alias=True, exclude_none=True))
        env = {
            ENV_CONFIG: str(config),
            ENV_JOB_NAME: name,
            ENV_PROGRESS_PORT: str(port),
            ENV_NPROC_PER_NODE: str(nproc_per_node),
            ENV_MASTER_PORT: str(_free_port()),
        }
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        stop = threading.Event()
        follower = threading.Thread(target=_follow, args=(port, report, stop), daemon=True)
        follower.start()
        try:
            return launch(Group.from_env(), worker_command(), log_dir=log_dir)
        finally:
            stop.set()
            follower.join()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def log_files(log_dir: Path) -> list[Path]:
    """The workers' log files the launcher wrote under `log_dir` (stdout and stderr of each
    rank, in a folder per launch)."""
    return sorted(p for p in log_dir.rglob("*.log") if p.is_file())
