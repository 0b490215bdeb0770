"""One asyncio task per FineTuneJob, driven by its watch events, so that nothing blocks deletion.

Kopf's daemons would run such a task, but kopf puts its finalizer on every object that has a
daemon (`kopf.daemon` registers it with `requires_finalizer=True`; see kopf's docs, "Daemons:
Deletion prevention"), so a FineTuneJob could not be deleted while the operator is down, and
neither could its namespace. Here the FineTuneJob watch stream drives the tasks: an event of a
FineTuneJob without a task starts one, later events hand the task the fresh object (and wake it
when the spec changed), and a DELETED event cancels it. The children go by owner-reference
garbage collection, which is the cluster's job, not the operator's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import kopf

Key = tuple[str, str]  # (namespace, the FineTuneJob's `finetune.dev/job` label value)
log = logging.getLogger(__name__)


def generation_of(body: kopf.Body) -> int | None:
    """metadata.generation (bumped by the API server on every spec change)."""
    value = body.get("metadata", {}).get("generation")
    return int(value) if value is not None else None


@dataclass(eq=False)
class Worker:
    """What a FineTuneJob's task reads: the newest object seen, and a wake-up signal."""

    key: Key
    body: kopf.Body
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def generation(self) -> int | None:
        return generation_of(self.body)

    async def nap(self, seconds: float) -> None:
        """Sleep until woken or `seconds` passed, whichever comes first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), seconds)


Run = Callable[[Worker], Coroutine[Any, Any, None]]


class Workers:
    """The running FineTuneJob tasks, and the generation at which each finished one ended."""

    def __init__(self) -> None:
        self._running: dict[Key, tuple[Worker, asyncio.Task[None]]] = {}
        self._finished: dict[Key, int | None] = {}

    def __len__(self) -> int:
        return len(self._running)

    def observe(self, key: Key, body: kopf.Body, run: Run) -> None:
        """An event of a FineTuneJob that exists: give its task the object, waking it when the
        spec changed; start a task unless one runs or one already ended at this generation."""
        if key in self._running:
            worker = self._running[key][0]
            changed = generation_of(body) != worker.generation
            worker.body = body
            if changed:
                worker.wake.set()
            return
        if key in self._finished and self._finished[key] == generation_of(body):
            return  # e.g. the event of its own last status patch
        self._finished.pop(key, None)
        worker = Worker(key, body)
        task = asyncio.create_task(self._run(worker, run), name=f"finetunejob {key[0]}/{key[1]}")
        self._running[key] = (worker, task)

    async def _run(self, worker: Worker, run: Run) -> None:
        try:
            await run(worker)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: logged; the next spec change or restart runs it again
            log.exception("the task of FineTuneJob %s/%s crashed", *worker.key)
        finally:
            if self._running.get(worker.key, (None,))[0] is worker:
                del self._running[worker.key]
        self._finished[worker.key] = worker.generation

    def wake(self, key: Key) -> None:
        """Something the task watches changed (its Job or a pod): run a pass now."""
        if key in self._running:
            self._running[key][0].wake.set()

    def forget(self, key: Key) -> None:
        """The FineTuneJob is gone or being deleted: stop its task and forget it."""
        self._finished.pop(key, None)
        if key in self._running:
            self._running.pop(key)[1].cancel()

    async def stop_all(self, timeout: float) -> None:
        """Cancel every task and wait up to `timeout` seconds for them to end."""
        tasks = [task for _, task in self._running.values()]
        self._running.clear()
        self._finished.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
