"""The per-FineTuneJob tasks (`workers`), retry backoff, and the classification of API errors."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
import pytest
from finetune_operator.kube import ApiErrorKind, api_error_kind
from finetune_operator.reconcile import MAX_BACKOFF_SECONDS, backoff
from finetune_operator.workers import Worker, Workers

KEY = ("ns", "ft")


def body(generation: int, **spec: Any) -> kopf.Body:
    return kopf.Body({"metadata": {"name": "ft", "generation": generation}, "spec": spec})


class Recorder:
    """A task that records what it saw, and ends when told to."""

    def __init__(self) -> None:
        self.started: list[int | None] = []
        self.seen: list[Any] = []
        self.finish = asyncio.Event()

    async def __call__(self, worker: Worker) -> None:
        self.started.append(worker.generation)
        while not self.finish.is_set():
            worker.wake.clear()
            self.seen.append(dict(worker.body["spec"]))
            await worker.nap(5)
        self.finish.clear()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_one_task_per_finetunejob_woken_only_by_spec_changes() -> None:
    workers, run = Workers(), Recorder()
    workers.observe(KEY, body(1, ttl=None), run)
    await settle()
    workers.observe(KEY, body(1, ttl=None), run)  # e.g. its own status patch: no new pass
    await settle()
    assert run.started == [1] and len(run.seen) == 1 and len(workers) == 1
    workers.observe(KEY, body(2, ttl=5), run)  # a spec change: the same task, the new body
    await settle()
    assert run.started == [1] and run.seen[-1] == {"ttl": 5}
    workers.wake(KEY)  # a Job or pod event
    await settle()
    assert len(run.seen) == 3
    await workers.stop_all(1)


async def test_a_finished_task_restarts_only_for_a_new_generation() -> None:
    workers, run = Workers(), Recorder()
    workers.observe(KEY, body(1), run)
    await settle()
    run.finish.set()
    workers.wake(KEY)
    await settle()
    assert len(workers) == 0
    workers.observe(KEY, body(1), run)  # the event of its own last write
    await settle()
    assert run.started == [1] and len(workers) == 0
    workers.observe(KEY, body(2, ttl=1), run)  # e.g. ttlSecondsAfterFinished set afterwards
    await settle()
    assert run.started == [1, 2] and len(workers) == 1
    await workers.stop_all(1)


async def test_forget_cancels_the_task_and_the_finished_mark() -> None:
    workers, run = Workers(), Recorder()
    workers.observe(KEY, body(1), run)
    await settle()
    workers.forget(KEY)
    await settle()
    assert len(workers) == 0
    workers.observe(KEY, body(1), run)  # recreated under the same name
    await settle()
    assert run.started == [1, 1]
    await workers.stop_all(1)
    assert len(workers) == 0


async def test_a_crashing_task_is_logged_and_restarted_by_the_next_spec_change(
    caplog: pytest.LogCaptureFixture,
) -> None:
    workers, calls = Workers(), []

    async def crash(worker: Worker) -> None:
        calls.append(worker.generation)
        raise RuntimeError("bug")

    workers.observe(KEY, body(1), crash)
    await settle()
    assert "crashed" in caplog.text and len(workers) == 0
    workers.observe(KEY, body(2), crash)
    await settle()
    assert calls == [1, 2]


def test_backoff_doubles_up_to_a_cap() -> None:
    assert [backoff(n, 5.0) for n in (1, 2, 3, 4)] == [5.0, 10.0, 20.0, 40.0]
    assert backoff(50, 5.0) == MAX_BACKOFF_SECONDS


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, ApiErrorKind.REJECTED),
        (404, ApiErrorKind.REJECTED),
        (405, ApiErrorKind.REJECTED),
        (413, ApiErrorKind.REJECTED),
        (422, ApiErrorKind.REJECTED),
        (403, ApiErrorKind.FORBIDDEN),
        (401, ApiErrorKind.TRANSIENT),
        (408, ApiErrorKind.TRANSIENT),
        (409, ApiErrorKind.TRANSIENT),
        (429, ApiErrorKind.TRANSIENT),
        (500, ApiErrorKind.TRANSIENT),
        (503, ApiErrorKind.TRANSIENT),
        (504, ApiErrorKind.TRANSIENT),
        (None, ApiErrorKind.TRANSIENT),
    ],
)
def test_api_error_kind(status: int | None, kind: ApiErrorKind) -> None:
    assert api_error_kind(status) == kind
