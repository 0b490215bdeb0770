"""One run per output location: the local lock file and the remote (S3) lease object."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from finetune_trainer import output_files
from finetune_trainer.lock import (
    LOCK_FILE,
    Holder,
    ObjectLease,
    OutputLockedError,
    OutputLockLostError,
    hold_output,
)

HOLD = """
import sys, time
from pathlib import Path
from finetune_trainer.lock import hold_output
with hold_output(sys.argv[1], Path(sys.argv[2]), seconds=30):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder_process(uri: str, local: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, uri, str(local)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _foreign_marker(path: Path, seconds: float) -> None:
    """filelock's owner record of a lease held on another host (which this host cannot probe)."""
    path.write_text(
        f"filelock/2\npid=4242\nhost=other-host\nmode=lease\ntoken=feed\nduration={seconds}\n"
    )


@pytest.fixture
def renewing() -> Iterator[list[threading.Event]]:
    """Stop events of background 'renewals' started by a test."""
    events: list[threading.Event] = []
    yield events
    for event in events:
        event.set()


def _renew_in_background(action: object, events: list[threading.Event]) -> None:
    stop = threading.Event()
    events.append(stop)

    def loop() -> None:
        while not stop.wait(0.2):
            action()  # type: ignore[operator]

    threading.Thread(target=loop, daemon=True).start()


# -- local outputs ----------------------------------------------------------------------------
def test_a_live_holder_on_this_host_is_refused_at_once_a_killed_one_replaced(
    tmp_path: Path,
) -> None:
    proc = _holder_process(str(tmp_path), tmp_path)
    try:
        started = time.monotonic()
        with (
            pytest.raises(OutputLockedError) as err,
            hold_output(str(tmp_path), tmp_path, seconds=30),
        ):
            pass
        assert time.monotonic() - started < 5  # no waiting for a lease that is alive here
        message = str(err.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in message
        assert message.startswith(f"output.uri: {tmp_path} is in use by another run")
        proc.kill()  # SIGKILL: the lock file stays behind, its pid is dead
        proc.wait()
        started = time.monotonic()
        with hold_output(str(tmp_path), tmp_path, seconds=30):
            assert time.monotonic() - started < 5
    finally:
        proc.kill()


def test_the_lease_of_a_crashed_holder_on_another_host_expires(tmp_path: Path) -> None:
    _foreign_marker(tmp_path / LOCK_FILE, seconds=1.0)
    waits: list[str] = []
    started = time.monotonic()
    with hold_output(str(tmp_path), tmp_path, seconds=1.0, on_wait=waits.append):
        took = time.monotonic() - started
    assert 1.0 <= took < 4.0
    assert len(waits) == 1 and "pid 4242 on host other-host" in waits[0]


def test_a_lease_renewed_on_another_host_is_refused_after_waiting(
    tmp_path: Path, renewing: list[threading.Event]
) -> None:
    lock = tmp_path / LOCK_FILE
    _foreign_marker(lock, seconds=1.0)
    _renew_in_background(lambda: os.utime(lock), renewing)
    started = time.monotonic()
    with (
        pytest.raises(OutputLockedError, match="pid 4242 on host other-host"),
        hold_output(str(tmp_path), tmp_path, seconds=1.0),
    ):
        pass
    assert time.monotonic() - started >= 2.0  # waited two lease periods for it to expire


def test_a_holder_notices_when_its_lock_was_taken_over(tmp_path: Path) -> None:
    with hold_output(str(tmp_path), tmp_path, seconds=0.6) as held:
        held.ensure_held()
        (tmp_path / LOCK_FILE).unlink()
        _foreign_marker(tmp_path / LOCK_FILE, seconds=0.6)  # another run took it over
        deadline = time.monotonic() + 5
        while not held.lease.lost and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(OutputLockLostError, match="another run took over"):
            held.ensure_held()


# -- remote outputs (S3 on moto) --------------------------------------------------------------
def _lease_record(uri: str, pid: int, host: str) -> None:
    record = {"pid": pid, "host": host, "token": "feed", "beat": 0, "leaseSeconds": 1.0}
    output_files.write_text(output_files.join(uri, LOCK_FILE), json.dumps(record))


def test_s3_lease_is_exclusive_and_released(s3: str, tmp_path: Path) -> None:
    uri = f"{s3}/runs/a"
    with hold_output(uri, tmp_path, seconds=30):
        record = json.loads(output_files.read_text(output_files.join(uri, LOCK_FILE)) or "{}")
        assert (record["pid"], record["host"]) == (os.getpid(), socket.gethostname())
        other = ObjectLease(output_files.join(uri, LOCK_FILE), 30, Holder(4242, "other-host"))
        assert not other.try_acquire(0)  # If-None-Match: the create fails while it exists
    assert output_files.read_text(output_files.join(uri, LOCK_FILE)) is None


def test_s3_lease_renewed_elsewhere_is_refused_a_dead_one_taken_over(
    s3: str, tmp_path: Path
) -> None:
    uri = f"{s3}/runs/b"
    holder = ObjectLease(output_files.join(uri, LOCK_FILE), 1.0, Holder(4242, "other-host"))
    assert holder.try_acquire(0)
    try:
        with (
            pytest.raises(OutputLockedError, match="pid 4242 on host other-host"),
            hold_output(uri, tmp_path, seconds=1.0),
        ):
            pass
    finally:
        holder.release()
    # a pod that crashed: its lease stays, unrenewed, until it expires
    _lease_record(uri, 4242, "other-host")
    started = time.monotonic()
    with hold_output(uri, tmp_path, seconds=1.0):
        assert 1.0 <= time.monotonic() - started < 5.0
    # a process that died on this host: taken over at once
    _lease_record(uri, _dead_pid(), socket.gethostname())
    started = time.monotonic()
    with hold_output(uri, tmp_path, seconds=30):
        assert time.monotonic() - started < 5.0


def test_s3_holder_notices_when_its_lease_was_taken_over(s3: str, tmp_path: Path) -> None:
    uri = f"{s3}/runs/c"
    with hold_output(uri, tmp_path, seconds=0.6) as held:
        _lease_record(uri, 4242, "other-host")  # overwritten: our If-Match renewal must fail
        deadline = time.monotonic() + 5
        while not held.lease.lost and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(OutputLockLostError):
            held.ensure_held()
    # the lease is the other run's: releasing ours leaves it in place
    assert "other-host" in (output_files.read_text(output_files.join(uri, LOCK_FILE)) or "")
