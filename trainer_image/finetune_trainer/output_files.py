"""Small files in a run's output location, local or remote (fsspec): markers, the run's
fingerprint, the remote lock's lease object."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune_trainer import storage


def filesystem(uri: str) -> tuple[Any, str]:
    """The fsspec filesystem of `uri` and the path on it (pvc://, file:// resolved)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(storage.resolve(uri), **storage.storage_options(uri))
    return fs, path


def join(uri: str, name: str) -> str:
    """`name` under the location `uri`."""
    return f"{uri.rstrip('/')}/{name}"


def read_text(uri: str) -> str | None:
    """The text of the file at `uri`, or None when there is none."""
    fs, path = filesystem(uri)
    try:
        return bytes(fs.cat_file(path)).decode()
    except FileNotFoundError:
        return None


def write_text(uri: str, text: str) -> None:
    """Write `text` to `uri`, replacing it whole (local files: written aside, then renamed)."""
    if storage.is_local(uri):
        path = Path(storage.resolve(uri))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return
    fs, remote = filesystem(uri)
    fs.pipe_file(remote, text.encode())
