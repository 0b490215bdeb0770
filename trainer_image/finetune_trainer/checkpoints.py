"""Checkpoints under `<output>/checkpoints/checkpoint-<step>/`, visible only when complete.

The Trainer writes a checkpoint directory; only after every file is written (and, for a remote
output, uploaded) does `mark_complete` add the marker file. Resume and status consider only
marked checkpoints, so a run killed mid-save never resumes from half a checkpoint.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any, Literal

from finetune_trainer import storage
from finetune_trainer.output_files import filesystem
from finetune_trainer.progress import CheckpointInfo, utcnow

log = logging.getLogger(__name__)

MARKER = ".finetune-complete.json"
_DIR_RE = re.compile(r"^checkpoint-(\d+)$")


def _step(name: str) -> int | None:
    match = _DIR_RE.match(name)
    return int(match.group(1)) if match else None


# What the best checkpoint is chosen by: training.earlyStopping.metric, else eval_loss.
BestMetric = Literal["eval_loss", "eval_accuracy"]


def mark_best(
    checkpoints: list[CheckpointInfo], metric: BestMetric = "eval_loss"
) -> list[CheckpointInfo]:
    """Sort by step and mark the best by `metric` (lowest loss, highest accuracy) as best;
    on a tie, the earliest (as transformers keeps it)."""
    ordered = sorted(checkpoints, key=lambda c: c.step)
    scored = [(value, c.step) for c in ordered if (value := getattr(c, metric)) is not None]
    if metric == "eval_accuracy":
        scored = [(-value, step) for value, step in scored]
    best = min(scored)[1] if scored else None
    return [c.model_copy(update={"best": c.step == best}) for c in ordered]


def latest_eval(log_history: list[dict[str, Any]], step: int) -> dict[str, float]:
    """The eval metrics a checkpoint records: the latest evaluation at or before `step` (not
    one at step 0, which evaluated the untuned model)."""
    evals = [h for h in log_history if "eval_loss" in h and 0 < h["step"] <= step]
    if not evals:
        return {}
    return {k: float(evals[-1][k]) for k in ("eval_loss", "eval_accuracy") if k in evals[-1]}


class CheckpointStore:
    """Checkpoints of one run: written locally by the Trainer, mirrored to a remote output."""

    def __init__(
        self, output_uri: str, local_root: Path, best_metric: BestMetric = "eval_loss"
    ) -> None:
        self.output_uri = output_uri.rstrip("/")
        self.best_metric = best_metric
        self.remote = not storage.is_local(output_uri)
        self.local_dir = local_root / "checkpoints"
        self.local_dir.mkdir(parents=True, exist_ok=True)

    def uri(self, step: int) -> str:
        """Where checkpoint `step` lives in the output location."""
        return f"{self.output_uri}/checkpoints/checkpoint-{step}"

    def upload_part(self, step: int) -> None:
        """Upload what this node wrote of checkpoint `step` to a remote output (the shards of
        an FSDP run on a pod other than rank 0's; before rank 0 marks it complete)."""
        if self.remote:
            storage.upload(self.local_dir / f"checkpoint-{step}", self.uri(step))

    def mark_complete(
        self, step: int, evaluation: dict[str, float], world_size: int = 1
    ) -> CheckpointInfo:
        """Declare checkpoint `step` complete: upload it (remote outputs), then write the marker
        (with the eval metrics of `evaluation`, the latest evaluation's, and the number of
        workers that wrote it)."""
        path = self.local_dir / f"checkpoint-{step}"
        info = CheckpointInfo(
            step=step,
            uri=self.uri(step),
            eval_loss=evaluation.get("eval_loss"),
            eval_accuracy=evaluation.get("eval_accuracy"),
            time=utcnow(),
            world_size=world_size,
        )
        marker = info.to_json()
        if self.remote:
            storage.upload(path, self.uri(step))
            self._sync_remote_deletions()
            fs, remote = filesystem(f"{self.uri(step)}/{MARKER}")
            fs.pipe_file(remote, marker.encode())
        tmp = path / f"{MARKER}.tmp"
        tmp.write_text(marker)
        tmp.replace(path / MARKER)
        return info

    def _sync_remote_deletions(self) -> None:
        """Delete remote checkpoints the Trainer rotated away locally (saveTotalLimit)."""
        kept = {p.name for p in self.local_dir.glob("checkpoint-*")}
        for info in self.complete():
            name = f"checkpoint-{info.step}"
            if name not in kept:
                fs, remote = filesystem(self.uri(info.step))
                fs.rm(remote, recursive=True)

    def complete(self) -> list[CheckpointInfo]:
        """All complete checkpoints, oldest first, the best by the run's metric marked."""
        found: list[CheckpointInfo] = []
        if self.remote:
            fs, base = filesystem(f"{self.output_uri}/checkpoints")
            for marker in fs.glob(f"{base}/checkpoint-*/{MARKER}"):
                found.append(CheckpointInfo.model_validate_json(fs.cat_file(marker)))
        else:
            for path in self.local_dir.glob(f"checkpoint-*/{MARKER}"):
                found.append(CheckpointInfo.model_validate_json(path.read_text()))
        return mark_best(found, self.best_metric)

    def prune_incomplete(self) -> list[Path]:
        """Delete local checkpoint directories without a marker (a save cut short)."""
        removed = []
        for path in self.local_dir.glob("checkpoint-*"):
            if _step(path.name) is not None and not (path / MARKER).exists():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
                log.warning("removed incomplete checkpoint %s", path.name)
        return removed

    def resume_path(self, fetch: bool = True) -> Path | None:
        """The newest complete checkpoint as a local directory, or None. `fetch` (one process
        per node): first delete incomplete local checkpoints and download a remote one."""
        if fetch:
            self.prune_incomplete()
        checkpoints = self.complete()
        if not checkpoints:
            return None
        newest = checkpoints[-1]
        path = self.local_dir / f"checkpoint-{newest.step}"
        if fetch and self.remote and not (path / MARKER).exists():
            storage.download(newest.uri, path)
        return path
