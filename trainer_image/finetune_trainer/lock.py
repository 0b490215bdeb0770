"""One run at a time per output location: a lease that the writing run holds and renews.

- Local outputs (a path, file://, pvc://): `filelock.SoftFileLease` on `<output>/.finetune.lock`,
  a lock file that records the holder's pid and host. A holder that died on this host is
  replaced at once; one on another host (another pod on a shared volume) once its lease has
  not been renewed for a whole lease period.
- Remote outputs (s3://, gs://, ...): a lease object `<output>/.finetune.lock` with the same
  record, created with a conditional write (S3: If-None-Match; elsewhere fsspec's create mode)
  and renewed every third of the lease period (S3: If-Match on the version it last wrote, so a
  holder notices when another run took over). A lease that stays unchanged for a whole period
  is expired and may be taken over.

A second run finds the lease held: by a live process on the same host, it is refused at once;
otherwise it waits up to two lease periods for the holder to release it or for it to expire (a
crashed pod's lease does), and is refused only when the holder keeps renewing it. Under
torchrun only the writing process (rank 0) takes the lease.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from finetune_trainer import output_files, storage

log = logging.getLogger(__name__)

LOCK_FILE = ".finetune.lock"
LEASE_SECONDS = 30.0


class OutputLockedError(Exception):
    """Another live run holds the output location."""


class OutputLockLostError(Exception):
    """This run's lease lapsed and another run took the output location over."""


# Tells this process from an earlier one with the same pid (a restarted container's pid 1).
_PROCESS = secrets.token_hex(8)


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: pid and host, and (remote leases) which process with that pid."""

    pid: int
    host: str
    process: str | None = None

    def __str__(self) -> str:
        return f"pid {self.pid} on host {self.host}"

    @property
    def on_this_host(self) -> bool:
        """Whether the holder runs (or ran) on this host."""
        return self.host == socket.gethostname()

    def alive_here(self) -> bool | None:
        """Whether the holder is a live process on this host (None: another host, unknown)."""
        if not self.on_this_host:
            return None
        if self.pid == os.getpid():
            return self.process == _PROCESS
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class Lease(Protocol):
    """A lease on an output location."""

    def try_acquire(self, timeout: float) -> bool:
        """Take the lease within `timeout` seconds (replacing a dead or expired holder)."""

    def holder(self) -> Holder | None:
        """The current holder, if one is recorded."""

    def release(self) -> None:
        """Give the lease up (if it is still ours)."""

    @property
    def lost(self) -> bool:
        """Whether another run took the lease over after we had it."""


class FileLease:
    """A lease on a local output: filelock's SoftFileLease (pid/host record, heartbeat)."""

    def __init__(self, path: Path, seconds: float) -> None:
        import filelock

        self._lost = threading.Event()
        self._lock = filelock.SoftFileLease(
            str(path), lease_duration=seconds, on_compromise=lambda _: self._lost.set()
        )

    def try_acquire(self, timeout: float) -> bool:
        import filelock

        try:
            self._lock.acquire(timeout=timeout, poll_interval=min(0.5, max(timeout / 10, 0.05)))
        except (filelock.Timeout, filelock.LeaseSettingsMismatch):  # the latter: held by a
            return False  # trainer with another lease period, which never expires for us
        return True

    def holder(self) -> Holder | None:
        owner = self._lock.owner
        return Holder(owner.pid, owner.hostname) if owner is not None else None

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()

    @property
    def lost(self) -> bool:
        return self._lost.is_set() or self._lock.compromise is not None


def _precondition_failed(exc: OSError) -> bool:
    """Whether an fsspec write failed on its condition (S3: 412 PreconditionFailed)."""
    if isinstance(exc, FileExistsError):
        return True
    response = getattr(exc.__cause__, "response", None) or {}
    return bool(response.get("Error", {}).get("Code") == "PreconditionFailed")


class ObjectLease:
    """A lease object in a remote output, renewed by a background thread."""

    SETTLE_SECONDS = 1.0  # read back after writing where the store has no conditional writes

    def __init__(self, uri: str, seconds: float, me: Holder | None = None) -> None:
        self.uri = uri
        self.seconds = seconds
        self.me = me or Holder(os.getpid(), socket.gethostname(), _PROCESS)
        self._fs, self._path = output_files.filesystem(uri)
        self._conditional = storage.scheme(uri) in ("s3", "s3a")
        self._token = secrets.token_hex(16)
        self._beat = 0
        self._version: str | None = None  # the ETag of our last write (S3)
        self._held = False
        self._seen: tuple[str, float] | None = None  # (record, first seen) of another holder
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the record ---------------------------------------------------------------------------
    def _record(self) -> bytes:
        doc = {
            "pid": self.me.pid,
            "host": self.me.host,
            "process": self.me.process,
            "token": self._token,
            "beat": self._beat,
            "leaseSeconds": self.seconds,
        }
        return json.dumps(doc).encode()

    def _read(self) -> tuple[str, str | None] | None:
        """(record text, S3 ETag) of the current lease, or None when there is none."""
        try:
            version = self._fs.info(self._path).get("ETag") if self._conditional else None
            return bytes(self._fs.cat_file(self._path)).decode(), version
        except FileNotFoundError:
            return None

    @staticmethod
    def _parse(text: str) -> dict[str, Any]:
        try:
            doc = json.loads(text)
        except ValueError:
            return {}
        return doc if isinstance(doc, dict) else {}

    def _write(self, *, create: bool, version: str | None = None) -> bool:
        """Write our record: `create` only if there is none, else over the lease at `version`."""
        kwargs: dict[str, Any] = {}
        if create:
            kwargs["mode"] = "create"
        else:
            kwargs["IfMatch"] = version
        try:
            self._fs.pipe_file(self._path, self._record(), **kwargs)
        except OSError as exc:
            if _precondition_failed(exc):
                return False
            raise
        if not self._conditional:  # another writer may have raced us: the last write wins
            time.sleep(self.SETTLE_SECONDS)
        current = self._read()
        if current is None or self._parse(current[0]).get("token") != self._token:
            return False
        self._version = current[1]
        return True

    # -- the lease ----------------------------------------------------------------------------
    def _claim(self) -> bool:
        current = self._read()
        if current is None:
            return self._write(create=True)
        text, version = current
        now = time.monotonic()
        if self._seen is None or self._seen[0] != text:
            self._seen = (text, now)
        holder = self._holder_of(text)
        dead = holder is not None and holder.alive_here() is False
        if not dead and now - self._seen[1] < self.seconds:
            return False
        log.warning("taking over the %s lease %s", "dead" if dead else "expired", self.uri)
        if version is None:  # no conditional overwrite: delete, then create (checked after)
            self._fs.rm(self._path)
            return self._write(create=True)
        return self._write(create=False, version=version)

    def try_acquire(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._claim():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, max(self.seconds / 10, 0.05)))
        self._held = True
        self._thread = threading.Thread(target=self._renew_loop, name="lease", daemon=True)
        self._thread.start()
        return True

    def _renew(self) -> bool:
        """Write a new beat over our own lease; False when it is no longer ours."""
        self._beat += 1
        if self._version is not None:
            return self._write(create=False, version=self._version)
        current = self._read()
        if current is None or self._parse(current[0]).get("token") != self._token:
            return False
        self._fs.pipe_file(self._path, self._record())
        return True

    def _renew_loop(self) -> None:
        interval = self.seconds / 3
        renewed = time.monotonic()
        while not self._stop.wait(interval):
            try:
                if not self._renew():
                    break
                renewed = time.monotonic()
            except OSError as exc:  # a store outage: the lease holds until it would expire
                log.warning("cannot renew the lease %s: %s", self.uri, exc)
                if time.monotonic() - renewed < self.seconds - interval:
                    continue
                break
        else:
            return
        log.error("lost the lease %s to another run", self.uri)
        self._lost.set()

    def _holder_of(self, text: str) -> Holder | None:
        doc = self._parse(text)
        if isinstance(doc.get("pid"), int) and isinstance(doc.get("host"), str):
            return Holder(doc["pid"], doc["host"], doc.get("process"))
        return None

    def holder(self) -> Holder | None:
        current = self._read()
        return self._holder_of(current[0]) if current is not None else None

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self._held or self._lost.is_set():
            return
        self._held = False
        with contextlib.suppress(OSError):
            current = self._read()
            if current is not None and self._parse(current[0]).get("token") == self._token:
                self._fs.rm(self._path)

    @property
    def lost(self) -> bool:
        return self._lost.is_set()


class OutputLock:
    """The held lease of a run on its output location."""

    def __init__(self, uri: str, lease: Lease) -> None:
        self.uri = uri
        self.lease = lease

    def ensure_held(self) -> None:
        """Raise OutputLockLostError if another run took the output over."""
        if self.lease.lost:
            raise OutputLockLostError(
                f"output.uri: another run took over {self.uri} while this run's lock had "
                "lapsed; stopped without writing more"
            )


def _lease_for(uri: str, local_dir: Path, seconds: float) -> Lease:
    if storage.is_local(uri):
        return FileLease(local_dir / LOCK_FILE, seconds)
    return ObjectLease(output_files.join(uri, LOCK_FILE), seconds)


@contextlib.contextmanager
def hold_output(
    uri: str,
    local_dir: Path,
    *,
    seconds: float = LEASE_SECONDS,
    on_wait: Callable[[str], None] = lambda message: None,
) -> Iterator[OutputLock]:
    """Hold the output location `uri` (staged in `local_dir`) for the duration of the block;
    raise OutputLockedError when another live run holds it."""
    lease = _lease_for(uri, local_dir, seconds)
    if not lease.try_acquire(0):
        holder = lease.holder()
        refusal = (
            f"output.uri: {uri} is in use by another run ({holder or 'unknown holder'}); wait "
            "for it to finish, or choose another output.uri (--output locally)"
        )
        if holder is not None and holder.on_this_host:  # a dead one would have been replaced
            raise OutputLockedError(refusal)
        wait = 2 * seconds
        on_wait(f"{uri} is locked by {holder or 'another run'}: waiting up to {wait:.0f} s")
        if not lease.try_acquire(wait):
            raise OutputLockedError(refusal)
    try:
        yield OutputLock(uri, lease)
    finally:
        lease.release()
