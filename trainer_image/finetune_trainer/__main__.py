"""Container entrypoint: `python -m finetune_trainer` (the contract: docs/contract.md).

Reads the run config from $FINETUNE_CONFIG, serves progress on $FINETUNE_PROGRESS_PORT, runs,
writes the summary to the termination-message file and exits with the contract's exit code.
When the group (torchrun's PET_* variables, see `finetune_trainer.launch`) has more than one
worker, this process is the launcher: it starts one worker per GPU (this same entrypoint) and
reports for the pod.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from finetune_trainer.config import ConfigError, parse_run_config
from finetune_trainer.distributed import Rank
from finetune_trainer.launch import Group, launch, worker_command
from finetune_trainer.progress import (
    CONFIG_PATH,
    ENV_CONFIG,
    ENV_PROGRESS_PORT,
    PROGRESS_PORT,
    ExitCode,
    Outcome,
    Summary,
)
from finetune_trainer.reporting import run_reported, write_termination_message
from finetune_trainer.runner import RunContext, scratch_from_env


def main() -> int:
    """Run the configured fine-tuning (or launch its workers); return the exit code."""
    rank = Rank.from_env()
    prefix = f"[rank {rank.rank}] " if rank.launched else ""
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s",
        stream=sys.stdout,
    )
    group = Group.from_env()
    if group.world_size > 1 and not rank.launched:
        summary = launch(group, worker_command())
        write_termination_message(summary)
        return int(summary.exit_code())
    config_path = Path(os.environ.get(ENV_CONFIG, CONFIG_PATH))
    try:
        run = parse_run_config(json.loads(config_path.read_text()))
    except (OSError, ValueError, RecursionError) as exc:
        errors = exc.errors if isinstance(exc, ConfigError) else [f"{config_path}: {exc}"]
        write_termination_message(
            Summary(
                outcome=Outcome.INVALID_INPUT, reason="InvalidConfig", message="\n".join(errors)
            )
        )
        print("invalid run config:\n  " + "\n  ".join(errors), file=sys.stderr)
        return int(ExitCode.INVALID_INPUT)
    ctx = RunContext(
        name=os.environ.get("FINETUNE_JOB_NAME", "finetune"), scratch=scratch_from_env()
    )
    summary = run_reported(
        run, ctx, progress_port=int(os.environ.get(ENV_PROGRESS_PORT, PROGRESS_PORT))
    )
    return int(summary.exit_code())


if __name__ == "__main__":
    raise SystemExit(main())
