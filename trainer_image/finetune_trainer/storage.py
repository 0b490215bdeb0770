"""Where things live: resolve the URIs of a run config to local paths or fsspec URLs.

Schemes (see docs/data.md):

- ``pvc://CLAIM/path``  -> ``$FINETUNE_PVC_ROOT/CLAIM/path`` (default ``/mnt/pvc``; the operator
  mounts each claim there);
- ``file:///x``         -> ``/x``;
- ``pkg://package/rel`` -> ``rel`` inside an installed Python package, found without importing it;
- a bare path           -> unchanged (relative to the working directory);
- anything else (``s3://``, ``gs://``, ``hf://``, ``http(s)://``) -> unchanged, read with fsspec.

fsspec is imported only by the functions that move bytes, so `resolve` stays cheap. What the
libraries raise while moving bytes leaves here classified (see `finetune_trainer.errors`):
`StorageError` for the user's problems (not found, no access, no credentials, not writable),
`TransientError` for outages (unreachable endpoint, timeouts, 5xx); anything else is a bug and
propagates unchanged.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import unquote, urlsplit

from finetune_trainer.errors import InvalidInputError, TransientError, classify
from finetune_trainer.progress import ENV_HF_TOKEN, ENV_PVC_ROOT, PVC_ROOT

ENV_S3_ENDPOINT = "FINETUNE_S3_ENDPOINT_URL"
ENV_HUB_TIMEOUT = "FINETUNE_HUB_TIMEOUT"
HUB_TIMEOUT = 60.0
_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
LOCAL_SCHEMES = ("pvc", "file", "pkg")


class StorageError(InvalidInputError, ValueError):
    """A URI that cannot be used: malformed, escaping its claim, not found, not accessible,
    no credentials. The message starts with the URI."""


def _where(uri: str) -> str:
    """`uri`, with the local path it resolved to when that differs."""
    try:
        local = resolve(uri)
    except StorageError:
        return uri
    return uri if local == uri else f"{uri} (resolved to {local})"


@contextmanager
def classified(uri: str) -> Iterator[None]:
    """Raise what the libraries raise for `uri` as StorageError or TransientError (see module doc)."""
    try:
        yield
    except (InvalidInputError, TransientError):
        raise
    except Exception as exc:
        found = classify(exc, _where(uri))
        if isinstance(found, TransientError):
            raise found from exc
        if found is not None:
            raise StorageError(str(found)) from exc
        raise


def scheme(uri: str) -> str | None:
    """The lower-case scheme of `uri`, or None for a bare path."""
    match = _SCHEME_RE.match(uri)
    return match.group(1).lower() if match else None


def _pvc_path(uri: str) -> str:
    rest = uri[len("pvc://") :]
    claim, _, sub = rest.partition("/")
    if not claim:
        raise StorageError(f"{uri}: pvc:// URIs need a claim name: pvc://CLAIM/path")
    root = Path(os.environ.get(ENV_PVC_ROOT) or PVC_ROOT)
    parts = PurePosixPath(sub).parts if sub else ()
    if ".." in parts or claim in (".", ".."):
        raise StorageError(f"{uri}: '..' is not allowed in pvc:// paths")
    return str(root.joinpath(claim, *parts))


def package_dir(package: str) -> list[Path]:
    """Directories of an installed package, located without importing it."""
    if not package or not package.replace("_", "a").isalnum() or package[0].isdigit():
        raise StorageError(f"pkg://{package}: not a top-level Python package name")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError) as exc:  # pragma: no cover - unusual import machinery
        raise StorageError(f"pkg://{package}: cannot locate package {package!r}: {exc}") from exc
    if spec is None:
        raise StorageError(
            f"pkg://{package}: Python package {package!r} is not installed "
            f"(pip install the distribution that provides it)"
        )
    locations = list(spec.submodule_search_locations or [])
    if not locations:
        raise StorageError(f"pkg://{package}: {package!r} is a module, not a package with files")
    return [Path(loc) for loc in locations]


def _pkg_path(uri: str) -> str:
    rest = uri[len("pkg://") :]
    package, _, rel = rest.partition("/")
    dirs = package_dir(package)
    parts = PurePosixPath(rel).parts if rel else ()
    if ".." in parts:
        raise StorageError(f"{uri}: '..' is not allowed in pkg:// paths")
    candidates = [d.joinpath(*parts) for d in dirs]
    for candidate in candidates:  # namespace packages have several directories
        if candidate.exists():
            return str(candidate)
    return str(candidates[0])


def resolve(uri: str) -> str:
    """Map pvc://, file:// and pkg:// URIs to local paths; return anything else unchanged."""
    kind = scheme(uri)
    if kind == "pvc":
        return _pvc_path(uri)
    if kind == "pkg":
        return _pkg_path(uri)
    if kind == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"{uri}: file:// URIs must be local (file:///path)")
        return unquote(parts.path)
    return uri


def is_local(uri: str) -> bool:
    """True when `uri` names something on this machine's filesystem (after `resolve`)."""
    kind = scheme(uri)
    return kind is None or kind in LOCAL_SCHEMES


def s3_endpoint() -> str | None:
    """The S3 endpoint override from the environment (MinIO, Ceph, moto), if any."""
    for name in (ENV_S3_ENDPOINT, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = os.environ.get(name)
        if value:
            return value
    return None


def storage_options(uri: str) -> dict[str, Any]:
    """fsspec keyword arguments for `uri`: S3 endpoint, Hugging Face token.

    S3 credentials are not copied here: s3fs (botocore) reads AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE and AWS_DEFAULT_REGION itself.
    """
    kind = scheme(uri)
    if kind in ("s3", "s3a"):
        endpoint = s3_endpoint()
        return {"endpoint_url": endpoint} if endpoint else {}
    if kind == "hf":
        token = os.environ.get(ENV_HF_TOKEN)
        return {"token": token} if token else {}
    return {}


def hub_timeout() -> float:
    """Seconds a Hugging Face Hub request may wait to connect or for data
    ($FINETUNE_HUB_TIMEOUT, default 60)."""
    try:
        return float(os.environ.get(ENV_HUB_TIMEOUT) or HUB_TIMEOUT)
    except ValueError:
        return HUB_TIMEOUT


def _bounded(request: Any) -> None:
    """httpx request hook: no timeout of the request is unbounded or above `hub_timeout`."""
    limit = hub_timeout()
    current = request.extensions.get("timeout") or {}
    request.extensions["timeout"] = {
        kind: limit if current.get(kind) is None else min(current[kind], limit)
        for kind in ("connect", "read", "write", "pool")
    }


def bound_hub_timeouts() -> None:
    """Bound every request of the Hub client (models, datasets, hf:// files) by `hub_timeout`.

    The client sends some requests (the repository listing of a download) without a timeout,
    so a hung Hub would hang the run; with this it times out and counts as transient."""
    from huggingface_hub import get_session

    session = get_session()
    hooks = session.event_hooks
    if _bounded not in hooks["request"]:
        hooks["request"].append(_bounded)
        session.event_hooks = hooks


def _fs(uri: str) -> tuple[Any, str]:
    import fsspec

    if scheme(uri) == "hf":
        bound_hub_timeouts()

    target = resolve(uri)
    fs, path = fsspec.core.url_to_fs(target, **storage_options(uri))
    return fs, path


@contextmanager
def open_binary(uri: str, compression: str | None = "infer") -> Iterator[IO[bytes]]:
    """Open `uri` for reading bytes (local or fsspec; .gz/.bz2/.xz/.zst decompressed)."""
    import fsspec

    if scheme(uri) == "hf":
        bound_hub_timeouts()
    with (
        classified(uri),
        fsspec.open(resolve(uri), "rb", compression=compression, **storage_options(uri)) as handle,
    ):
        yield handle


@contextmanager
def open_text(uri: str, encoding: str = "utf-8") -> Iterator[IO[str]]:
    """Open `uri` for reading text (local or fsspec; compressed files decompressed)."""
    import fsspec

    if scheme(uri) == "hf":
        bound_hub_timeouts()
    with (
        classified(uri),
        fsspec.open(
            resolve(uri), "rt", encoding=encoding, compression="infer", **storage_options(uri)
        ) as handle,
    ):
        yield handle


def exists(uri: str) -> bool:
    """Whether `uri` names an existing file or directory/prefix."""
    with classified(uri):
        fs, path = _fs(uri)
        return bool(fs.exists(path))


def list_files(uri: str) -> list[str]:
    """The files under `uri` as full URIs (sorted); `[uri]` when it is a single file."""
    with classified(uri):
        if is_local(uri):
            local = Path(resolve(uri))
            if local.is_dir():
                return sorted(str(p) for p in local.rglob("*") if p.is_file())
            return [str(local)]
        fs, path = _fs(uri)
        if fs.isdir(path):
            base = uri.rstrip("/")
            root = path.rstrip("/")
            return sorted(base + "/" + f[len(root) + 1 :] for f in fs.find(path))
        return [uri]


def download(uri: str, dest_dir: str | Path) -> Path:
    """Make `uri` available locally and return its local path.

    - a local path / file:// / pvc:// / pkg:// URI is returned resolved, without copying;
    - a remote file is copied to ``dest_dir/<name>`` and that file's path is returned;
    - a remote directory/prefix is copied recursively into `dest_dir` (its files directly
      under `dest_dir`, sub-folders kept) and `dest_dir` is returned.

    A missing `uri` is a StorageError saying "not found".
    """
    with classified(uri):
        if is_local(uri):
            local = Path(resolve(uri))
            if not local.exists():
                raise StorageError(f"{_where(uri)}: not found")
            return local
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        fs, path = _fs(uri)
        if fs.isdir(path):
            root = path.rstrip("/")
            remote = [f for f in fs.find(root) if not f.endswith("/")]
            if not remote:
                raise StorageError(f"{uri}: not found (the prefix holds no files)")
            local_paths = [str(dest / f[len(root) + 1 :]) for f in remote]
            for lp in local_paths:
                Path(lp).parent.mkdir(parents=True, exist_ok=True)
            fs.get(remote, local_paths)
            return dest
        if not fs.exists(path):
            raise StorageError(f"{uri}: not found")
        target = dest / PurePosixPath(path).name
        fs.get_file(path, str(target))
        return target


def upload(local_path: str | Path, uri: str) -> None:
    """Copy a local file or directory (recursively) to `uri` (local, pvc://, s3://, ...).

    A directory's contents land directly under `uri` (``local/a/b`` -> ``uri/a/b``);
    a file lands at `uri` itself.
    """
    source = Path(local_path)
    if not source.exists():
        raise FileNotFoundError(f"{source}: nothing to upload")
    with classified(uri):
        if is_local(uri):
            target = Path(resolve(uri))
            if source.is_dir():
                shutil.copytree(source, target, dirs_exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
            return
        fs, path = _fs(uri)
        if source.is_file():
            fs.put_file(str(source), path)
            return
        files = sorted(p for p in source.rglob("*") if p.is_file())
        root = path.rstrip("/")
        remote = [f"{root}/{p.relative_to(source).as_posix()}" for p in files]
        if files:
            fs.put([str(p) for p in files], remote)
