"""A FineTuneJob's task: create its children once, keep its status true, then apply its TTL.

One pass (`Observer.step`) reads only in-memory state (the indexes of our Jobs and pods that
kopf keeps from its watches, and the newest FineTuneJob object), creates the ConfigMap and the
Job if needed, fetches the running trainer's /progress, derives the status and patches what
changed. `observe` repeats passes on wake-ups and handles API errors:

- transient (5xx, 429, 409, timeouts, dropped connections): retried with exponential backoff;
- 403 on a child (RBAC, ResourceQuota, a terminating namespace): condition Running=False,
  reason Blocked, with the API server's message, retried with backoff;
- any other refusal of a child (400, 404, 422, ...): phase Failed, reason ChildRejected, with
  the API server's message; never retried (a user must change something);
- the status write refused (422: a bug): phase Failed, reason StatusRejected.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

import aiohttp
import kopf

from finetune_operator import metrics
from finetune_operator.api import FineTuneJobSpec, FineTuneJobStatus
from finetune_operator.builders import build_configmap, build_job, build_service
from finetune_operator.kube import (
    ApiErrorKind,
    ApiException,
    Kube,
    api_error_kind,
    api_message,
    fetch_progress,
)
from finetune_operator.names import job_name
from finetune_operator.policy import Policy, validate
from finetune_operator.reasons import Reason
from finetune_operator.status import (
    TERMINAL_PHASES,
    blocked_status,
    derive_status,
    failed_status,
    get_condition,
    latest_summary,
    parse_status,
    phase_event,
    running_pod,
    status_patch,
    tracking_event,
)
from finetune_operator.workers import Key, Worker

Obj = dict[str, Any]
log = logging.getLogger("finetune_operator")

RESYNC_SECONDS = 60.0  # re-derive without a wake-up this often (no trainer pod to poll)
MAX_BACKOFF_SECONDS = 300.0


@dataclass(frozen=True)
class Runtime:
    """What every FineTuneJob task shares: policy, API client, indexes and the HTTP session
    for /progress (which never carries API credentials)."""

    policy: Policy
    kube: Kube
    http: aiohttp.ClientSession
    jobs: kopf.Index[Key, Obj]
    pods: kopf.Index[Key, Obj]


class NameConflictError(Exception):
    """A child's name is taken by an object that this FineTuneJob does not own."""


class ChildError(Exception):
    """The API server refused to create or read a child."""

    def __init__(self, kind: str, name: str, error: ApiException) -> None:
        self.error_kind = api_error_kind(error.status)
        self.status = error.status
        super().__init__(f"the API server refused {kind} {name}: {api_message(error)}")


class ChildVanishedError(Exception):
    """A child existed (409 on create) but was gone when read back: try again."""


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def backoff(failures: int, base: float) -> float:
    """Seconds to wait after `failures` failures in a row: base, 2 base, 4 base, ... (capped)."""
    return float(min(MAX_BACKOFF_SECONDS, base * 2 ** max(0, failures - 1)))


def _owned_by(obj: Obj, uid: str | None) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid for ref in refs)


def _indexed(index: kopf.Index[Key, Obj], key: Key) -> list[Obj]:
    return list(index.get(key, []))


def _created_at(obj: Obj) -> datetime | None:
    stamp = obj.get("metadata", {}).get("creationTimestamp")
    if not stamp:
        return None
    try:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return None


async def ensure(kube: Kube, manifest: Obj, owner_uid: str | None) -> tuple[Obj, bool]:
    """Create a child; if it exists, use it when we own it. (object, created?)."""
    kind, meta = manifest["kind"], manifest["metadata"]
    try:
        return await kube.create_child(manifest), True
    except ApiException as exc:
        if exc.status != 409:
            raise ChildError(kind, meta["name"], exc) from exc
    try:
        existing = await kube.read_child(kind, meta["namespace"], meta["name"])
    except ApiException as exc:
        raise ChildError(kind, meta["name"], exc) from exc
    if existing is None:
        raise ChildVanishedError(f"{kind} {meta['name']} vanished while being created")
    if not _owned_by(existing, owner_uid):
        raise NameConflictError(
            f"a {kind} named {meta['name']} already exists and is not owned by this "
            "FineTuneJob; rename the FineTuneJob or delete that object"
        )
    return existing, False


async def write_status(kube: Kube, body: kopf.Body, old: Obj, new: FineTuneJobStatus) -> Obj | None:
    """Patch only the changed status fields; the stored status, or None when unchanged."""
    patch = status_patch(old, new)
    if not patch:
        return None
    meta = body["metadata"]
    updated = await kube.patch_finetunejob_status(meta["namespace"], meta["name"], patch)
    return dict(updated.get("status") or {})


def announce(body: kopf.Body, previous: FineTuneJobStatus, new: FineTuneJobStatus) -> None:
    """Post the Events of a phase transition and of a tracker that stopped reporting (after
    the status write succeeded)."""
    for event in (phase_event(previous, new), tracking_event(previous, new)):
        if event is None:
            continue
        post = kopf.warn if event.warning else kopf.info
        post(body, reason=event.reason, message=event.message)


async def fail(kube: Kube, body: kopf.Body, old: Obj, reason: Reason, message: str) -> Obj:
    """Write the operator's own Failed status (the reasons in OPERATOR_FAILURES) and post a
    Warning; the stored status."""
    meta = body["metadata"]
    # a refused status write starts from an empty status: the refused part may be anywhere
    base = FineTuneJobStatus() if reason == Reason.STATUS_REJECTED else parse_status(old)
    new = failed_status(base, reason, message, now_utc(), meta.get("generation"))
    written = await write_status(kube, body, old, new)
    kopf.warn(body, reason=reason, message=message)
    metrics.observe(meta["namespace"], meta["name"], new)
    return old if written is None else written


@dataclass
class Observer:
    """What one FineTuneJob's task knows between passes."""

    worker: Worker
    runtime: Runtime
    spec: FineTuneJobSpec  # re-parsed when the raw spec changes
    raw_spec: Obj  # what `spec` was parsed from
    status: Obj  # the status as last read or written
    created_job: Obj | None = None  # the Job we created, until the index has it
    suspend_requested: bool | None = None  # the Job's spec.suspend as we last set or built it

    @property
    def body(self) -> kopf.Body:
        return self.worker.body

    @property
    def ref(self) -> str:
        """namespace/name, for log lines."""
        meta = self.body["metadata"]
        return f"{meta['namespace']}/{meta['name']}"

    def refresh_spec(self) -> FineTuneJobSpec:
        """The spec of the newest object (placement fields such as suspend and
        ttlSecondsAfterFinished may change; the training part is immutable, by CEL)."""
        raw_spec = dict(self.body.get("spec") or {})
        if raw_spec != self.raw_spec:
            meta = self.body["metadata"]
            fresh, _ = validate(raw_spec, meta["namespace"], self.runtime.policy)
            self.spec = fresh or self.spec
            self.raw_spec = raw_spec
        return self.spec

    async def write(self, new: FineTuneJobStatus) -> bool:
        """Write the status if it changed; whether it did."""
        written = await write_status(self.runtime.kube, self.body, self.status, new)
        if written is None:
            return False
        self.status = written
        return True

    async def ensure_children(self, spec: FineTuneJobSpec) -> tuple[Obj, bool]:
        """ConfigMap (the Job mounts it), the headless Service of a several-pod run (its pods'
        DNS names), then the Job. Returns (job, created?)."""
        meta = self.body["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta.get("uid")
        policy, kube = self.runtime.policy, self.runtime.kube
        service = build_service(name, namespace, spec)
        children = [build_configmap(name, namespace, spec), *([service] if service else [])]
        job = build_job(name, namespace, spec, policy, uid)
        kopf.adopt([*children, job], owner=self.body)
        for child in children:
            await ensure(kube, child, uid)
        return await ensure(kube, job, uid)

    async def step(self) -> tuple[FineTuneJobStatus, bool]:
        """One pass: create the children if needed, derive and patch the status.

        Returns (the new status, whether a trainer pod is running).
        """
        spec = self.refresh_spec()
        meta = self.body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        jobs = _indexed(self.runtime.jobs, self.worker.key)
        pods = _indexed(self.runtime.pods, self.worker.key)
        previous = parse_status(self.status)
        job = jobs[0] if jobs else self.created_job
        if jobs:
            self.created_job = None
        created = False
        if job is None and previous.phase not in TERMINAL_PHASES:
            job, created = await self.ensure_children(spec)
            self.created_job = job
            if created:
                self.suspend_requested = bool(job.get("spec", {}).get("suspend"))
                self._created()
        if job is not None and previous.phase not in TERMINAL_PHASES:
            await self.reconcile_suspend(spec, job)
        running = running_pod(pods)
        progress = None
        if running is not None:
            progress = await fetch_progress(self.runtime.http, running)
        new = derive_status(
            spec,
            job,
            pods,
            progress,
            latest_summary(pods),
            previous,
            now_utc(),
            meta.get("generation"),
        )
        if await self.write(new) and not (created and new.phase not in TERMINAL_PHASES):
            announce(self.body, previous, new)  # JobCreated said it for the first phase
        metrics.observe(namespace, name, new)
        return new, running is not None

    async def reconcile_suspend(self, spec: FineTuneJobSpec, job: Obj) -> None:
        """Suspend or resume the Job as spec.suspend says. With spec.queueName, Kueue owns
        admission: resuming only withdraws our suspension, and Kueue unsuspends the Job."""
        wanted = spec.suspend
        if bool(job.get("spec", {}).get("suspend")) == wanted or self.suspend_requested == wanted:
            return
        if not wanted and spec.queue_name:
            if self.suspend_requested:
                kopf.info(
                    self.body, reason="Resuming", message="resume requested; Kueue admits the Job"
                )
            self.suspend_requested = False
            return
        name = job["metadata"]["name"]
        try:
            await self.runtime.kube.patch_job(
                job["metadata"]["namespace"], name, {"spec": {"suspend": wanted}}
            )
        except ApiException as exc:
            raise ChildError("Job", name, exc) from exc
        self.suspend_requested = wanted
        if wanted:
            kopf.info(
                self.body,
                reason="Suspending",
                message="suspending the Job (the trainer saves a checkpoint)",
            )
        else:
            kopf.info(
                self.body, reason="Resuming", message="resuming the Job from the last checkpoint"
            )

    def _created(self) -> None:
        name = self.body["metadata"]["name"]
        kopf.info(self.body, reason=Reason.JOB_CREATED, message=f"created Job {job_name(name)}")
        started = _created_at(dict(self.body))
        if started is not None:
            latency = max(0.0, (datetime.now(UTC) - started).total_seconds())
            metrics.JOB_CREATE_LATENCY.observe(latency)

    async def block(self, message: str) -> None:
        """Show why the children cannot be created yet (403), and keep trying."""
        previous = parse_status(self.status)
        new = blocked_status(previous, message, now_utc(), self.body["metadata"].get("generation"))
        was = get_condition(previous.conditions, "Running")
        if await self.write(new) and (was is None or was.reason != Reason.BLOCKED):
            kopf.warn(self.body, reason=Reason.BLOCKED, message=message)

    async def fail(self, reason: Reason, message: str) -> None:
        """Fail for good with the operator's own reason (a Warning says why)."""
        self.status = await fail(self.runtime.kube, self.body, self.status, reason, message)


class Next(Enum):
    """What a FineTuneJob's task does after a pass."""

    POLL = "poll"  # a trainer runs: poll its /progress again after the interval
    WAIT = "wait"  # nothing runs: wait for an event of a child (or the resync)
    RETRY = "retry"  # the pass failed: back off, then try again
    DONE = "done"  # the run ended (the status says how): apply the TTL


async def _fail(observer: Observer, reason: Reason, message: str) -> Next:
    try:
        await observer.fail(reason, message)
    except (ApiException, TimeoutError, aiohttp.ClientError) as exc:
        log.warning("%s: could not write the %s status, retrying: %s", observer.ref, reason, exc)
        return Next.RETRY
    return Next.DONE


async def _pass(observer: Observer) -> Next:
    """One pass, its API errors classified (see the module docstring)."""
    ref = observer.ref
    try:
        status, running = await observer.step()
    except NameConflictError as exc:
        metrics.RECONCILE_ERRORS.labels(kind=Reason.NAME_CONFLICT).inc()
        return await _fail(observer, Reason.NAME_CONFLICT, str(exc))
    except ChildError as exc:
        metrics.RECONCILE_ERRORS.labels(kind=f"Api{exc.status}").inc()
        if exc.error_kind == ApiErrorKind.REJECTED:
            return await _fail(observer, Reason.CHILD_REJECTED, str(exc))
        log.warning("%s: retrying: %s", ref, exc)
        if exc.error_kind == ApiErrorKind.FORBIDDEN:
            with contextlib.suppress(ApiException, TimeoutError, aiohttp.ClientError):
                await observer.block(f"{exc}; retrying")
        return Next.RETRY
    except ApiException as exc:  # the status write
        metrics.RECONCILE_ERRORS.labels(kind=f"Api{exc.status}").inc()
        if exc.status != 404 and api_error_kind(exc.status) == ApiErrorKind.REJECTED:
            message = f"the API server refused the status update: {api_message(exc)}"
            log.error("%s: %s", ref, message)
            return await _fail(observer, Reason.STATUS_REJECTED, message)
        log.warning("%s: status not written, retrying: %s", ref, api_message(exc))
        return Next.RETRY
    except (TimeoutError, aiohttp.ClientError, ChildVanishedError) as exc:
        metrics.RECONCILE_ERRORS.labels(kind=type(exc).__name__).inc()
        log.warning("%s: retrying: %r", ref, exc)
        return Next.RETRY
    if status.phase in TERMINAL_PHASES:
        return Next.DONE
    return Next.POLL if running else Next.WAIT


async def observe(worker: Worker, runtime: Runtime) -> None:
    """The task of one FineTuneJob: passes until the run ends, then its TTL."""
    body = worker.body
    raw_spec = dict(body.get("spec") or {})
    spec, errors = validate(raw_spec, body["metadata"]["namespace"], runtime.policy)
    if spec is None:
        await refuse(worker, runtime, errors)
        return
    observer = Observer(worker, runtime, spec, raw_spec, dict(body.get("status") or {}))
    interval = runtime.policy.poll_interval_seconds
    failures = 0
    while True:
        worker.wake.clear()
        match await _pass(observer):
            case Next.DONE:
                await expire(observer)
                return
            case Next.RETRY:
                failures += 1
                await worker.nap(backoff(failures, interval))
            case Next.POLL:
                failures = 0
                await worker.nap(interval)
            case Next.WAIT:
                failures = 0
                await worker.nap(max(interval, RESYNC_SECONDS))


async def refuse(worker: Worker, runtime: Runtime, errors: list[str]) -> None:
    """An invalid spec: phase Failed, condition Failed/InvalidSpec naming the fields, a Warning
    (once: not again when the status already says so), and nothing is created."""
    metrics.INVALID_SPECS.inc()
    message = "; ".join(errors)
    meta = worker.body["metadata"]
    ref = f"{meta['namespace']}/{meta['name']}"
    log.error("%s: invalid spec: %s", ref, message)
    status = dict(worker.body.get("status") or {})
    failed = get_condition(parse_status(status).conditions, "Failed")
    if failed is not None and failed.reason == Reason.INVALID_SPEC:
        return
    failures = 0
    while True:
        try:
            await fail(runtime.kube, worker.body, status, Reason.INVALID_SPEC, message)
            return
        except ApiException as exc:
            if api_error_kind(exc.status) != ApiErrorKind.TRANSIENT:
                log.error("%s: InvalidSpec status not written: %s", ref, api_message(exc))
                return
            log.warning("%s: InvalidSpec status not written, retrying: %s", ref, exc)
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("%s: InvalidSpec status not written, retrying: %r", ref, exc)
        failures += 1
        await worker.nap(backoff(failures, runtime.policy.poll_interval_seconds))


async def expire(observer: Observer) -> None:
    """Delete the finished FineTuneJob after spec.ttlSecondsAfterFinished, as it is now: an edit
    of the TTL wakes the task and counts (the Job itself has no TTL: no recreate loop)."""
    finished = parse_status(observer.status).completion_time or now_utc()
    worker, failures = observer.worker, 0
    while True:
        worker.wake.clear()
        ttl = observer.refresh_spec().ttl_seconds_after_finished
        if ttl is None:
            return  # a later spec change starts a new task
        remaining = (finished + timedelta(seconds=ttl) - now_utc()).total_seconds()
        if remaining > 0:
            await worker.nap(remaining)
            continue
        meta = observer.body["metadata"]
        log.info("%s: ttlSecondsAfterFinished elapsed: deleting it", observer.ref)
        try:
            await observer.runtime.kube.delete_finetunejob(meta["namespace"], meta["name"])
            return
        except ApiException as exc:
            if api_error_kind(exc.status) != ApiErrorKind.TRANSIENT:
                log.error("%s: cannot delete it after its TTL: %s", observer.ref, api_message(exc))
                return
            log.warning("%s: deleting it after its TTL failed, retrying: %s", observer.ref, exc)
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("%s: deleting it after its TTL failed, retrying: %r", observer.ref, exc)
        failures += 1
        await worker.nap(backoff(failures, observer.runtime.policy.poll_interval_seconds))
