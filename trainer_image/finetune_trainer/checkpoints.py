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
from typing import Any

from finetune_trainer import storage
from finetune_trainer.progress import CheckpointInfo, utcnow

log = logging.getLogger(__name__)

MARKER = ".finetune-complete.json"
_DIR_RE = re.compile(r"^checkpoint-(\d+)$")


def _step(name: str) -> int | None:
    match = _DIR_RE.match(name)
    return int(match.group(1)) if match else None


def _fs(uri: str) -> tuple[Any, str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **storage.storage_options(uri))
    return fs, path


def mark_best(checkpoints: list[CheckpointInfo]) -> list[CheckpointInfo]:
    """Sort by step and mark the one with the lowest eval loss (if any has one) as best."""
    ordered = sorted(checkpoints, key=lambda c: c.step)
    scored = [c for c in ordered if c.eval_loss is not None]
    best = min(scored, key=lambda c: c.eval_loss or 0.0).step if scored else None
    return [c.model_copy(update={"best": c.step == best}) for c in ordered]


class CheckpointStore:
    """Checkpoints of one run: written locally by the Trainer, mirrored to a remote output."""

    def __init__(self, output_uri: str, local_root: Path) -> None:
        self.output_uri = output_uri.rstrip("/")
        self.remote = not storage.is_local(output_uri)
        self.local_dir = local_root / "checkpoints"
        self.local_dir.mkdir(parents=True, exist_ok=True)

    def uri(self, step: int) -> str:
        """Where checkpoint `step` lives in the output location."""
        return f"{self.output_uri}/checkpoints/checkpoint-{step}"

    def mark_complete(self, step: int, eval_loss: float | None) -> CheckpointInfo:
        """Declare checkpoint `step` complete: upload it (remote outputs), then write the marker."""
        path = self.local_dir / f"checkpoint-{step}"
        info = CheckpointInfo(step=step, uri=self.uri(step), eval_loss=eval_loss, time=utcnow())
        marker = info.to_json()
        if self.remote:
            storage.upload(path, self.uri(step))
            self._sync_remote_deletions()
            fs, remote = _fs(f"{self.uri(step)}/{MARKER}")
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
                fs, remote = _fs(self.uri(info.step))
                fs.rm(remote, recursive=True)

    def complete(self) -> list[CheckpointInfo]:
        """All complete checkpoints, oldest first, best marked."""
        found: list[CheckpointInfo] = []
        if self.remote:
            fs, base = _fs(f"{self.output_uri}/checkpoints")
            for marker in fs.glob(f"{base}/checkpoint-*/{MARKER}"):
                found.append(CheckpointInfo.model_validate_json(fs.cat_file(marker)))
        else:
            for path in self.local_dir.glob(f"checkpoint-*/{MARKER}"):
                found.append(CheckpointInfo.model_validate_json(path.read_text()))
        return mark_best(found)

    def prune_incomplete(self) -> list[Path]:
        """Delete local checkpoint directories without a marker (a save cut short)."""
        removed = []
        for path in self.local_dir.glob("checkpoint-*"):
            if _step(path.name) is not None and not (path / MARKER).exists():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
                log.warning("removed incomplete checkpoint %s", path.name)
        return removed

    def resume_path(self) -> Path | None:
        """The newest complete checkpoint as a local directory (downloaded if remote), or None."""
        self.prune_incomplete()
        checkpoints = self.complete()
        if not checkpoints:
            return None
        newest = checkpoints[-1]
        path = self.local_dir / f"checkpoint-{newest.step}"
        if self.remote and not (path / MARKER).exists():
            storage.download(newest.uri, path)
        return path

    @staticmethod
    def trainer_eval_loss(log_history: list[dict[str, float]], step: int) -> float | None:
        """The latest eval loss logged at or before `step`."""
        losses = [h["eval_loss"] for h in log_history if "eval_loss" in h and h["step"] <= step]
        return losses[-1] if losses else None
