"""The FineTuneJob operator: thin kopf handlers over pure builders and `derive_status`.

    kopf run --standalone --all-namespaces -m finetune_operator.main \
        --liveness=http://0.0.0.0:8080/healthz
    python -m finetune_operator.main        # the same, with those defaults

Handlers:
- create/resume: validate the spec and the platform policy. Invalid -> phase Failed, condition
  Failed/InvalidSpec naming the field, a Warning event, `kopf.PermanentError` (no retries).
- indexes of the Jobs and pods labelled `finetune.dev/job` (kopf keeps them from its watch
  streams, server-side filtered by that label), and an event handler that wakes the owning
  FineTuneJob's daemon whenever one of them changes.
- a daemon per valid FineTuneJob (the only writer of its status): creates the ConfigMap and the
  Job once (idempotent, owner-checked), then on every wake-up derives the status from the
  indexes and, while a trainer pod runs, its /progress (every FINETUNE_POLL_INTERVAL_SECONDS),
  and patches only what changed. No API reads per pass. Once finished, it waits out
  `ttlSecondsAfterFinished` and deletes the FineTuneJob.
- spec.suspend changes: suspend / resume the Job.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import kopf
from kubernetes_asyncio.config import ConfigException

from finetune_operator import metrics
from finetune_operator.api import GROUP, PLURAL, VERSION, ConfigError, FineTuneJobSpec, parse_spec
from finetune_operator.builders import JOB_LABEL, build_configmap, build_job, job_name
from finetune_operator.kube import (
    ApiException,
    Kube,
    api_message,
    connect,
    connection_info,
    fetch_progress,
    in_cluster,
    load_configuration,
)
from finetune_operator.policy import Policy, check_policy
from finetune_operator.status import (
    TERMINAL_PHASES,
    derive_status,
    failed_status,
    get_condition,
    latest_summary,
    parse_status,
    sort_pods,
    status_patch,
    terminated_state,
)

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace, FineTuneJob name)
log = logging.getLogger("finetune_operator")

FINALIZER = f"{GROUP}/finalizer"
RESOURCE = (GROUP, VERSION, PLURAL)
JOBS = ("batch", "v1", "jobs")
PODS = ("v1", "pods")
OWNED = {JOB_LABEL: kopf.PRESENT}
RESYNC_SECONDS = 60.0  # re-derive without a wake-up this often (no trainer pod to poll)


@dataclass
class State:
    """Process-wide operator state, (re)initialised by the startup handler."""

    policy: Policy = field(default_factory=Policy)
    kube: Kube | None = None
    http: aiohttp.ClientSession | None = None  # for /progress: never carries API credentials
    wakeups: dict[Key, asyncio.Event] = field(default_factory=dict)


STATE = State()


class NameConflictError(Exception):
    """A child's name is taken by an object that this FineTuneJob does not own."""


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def kube() -> Kube:
    if STATE.kube is None:
        raise kopf.TemporaryError("the operator is not connected yet", delay=5)
    return STATE.kube


# --------------------------------------------------------------------------------------------
# start-up: every setting in one place
# --------------------------------------------------------------------------------------------
def configure(settings: kopf.OperatorSettings) -> None:
    """Kopf settings: bookkeeping in finetune.dev annotations, never in the public status;
    Jobs and pods watched only when labelled as ours (server-side selector)."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.label_selectors[JOBS] = JOB_LABEL
    settings.watching.label_selectors[PODS] = JOB_LABEL
    settings.networking.request_timeout = 60


@kopf.on.startup()
async def startup(**kwargs: Any) -> None:
    settings: kopf.OperatorSettings = kwargs["settings"]
    logger = kwargs["logger"]
    configure(settings)
    STATE.policy = Policy.from_env()
    STATE.kube = await connect()
    STATE.http = aiohttp.ClientSession()
    STATE.wakeups.clear()
    metrics.start()
    logger.info("policy: %s", STATE.policy.model_dump_json())


@kopf.on.login()
async def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """Kopf's credentials: the pod's service account (kopf re-reads the rotating token), else
    the kubeconfig as kubernetes_asyncio reads it (exec and auth-provider plugins too)."""
    if in_cluster():
        return kopf.login_with_service_account(settings=kwargs["settings"])
    try:
        return connection_info(await load_configuration())
    except (ConfigException, OSError) as exc:
        raise kopf.LoginError(f"no usable Kubernetes credentials: {exc}") from exc


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if STATE.kube is not None:
        await STATE.kube.close()
        STATE.kube = None
    if STATE.http is not None:
        await STATE.http.close()
        STATE.http = None


# --------------------------------------------------------------------------------------------
# what the watch streams tell us about our Jobs and pods
# --------------------------------------------------------------------------------------------
def _owner_key(namespace: str | None, labels: Mapping[str, str]) -> Key:
    return (namespace or "", labels[JOB_LABEL])


@kopf.index(*JOBS, labels=OWNED)
def finetune_jobs(**kwargs: Any) -> dict[Key, Obj]:
    """Our batch/v1 Jobs by (namespace, FineTuneJob name)."""
    return {_owner_key(kwargs["namespace"], kwargs["labels"]): dict(kwargs["body"])}


@kopf.index(*PODS, labels=OWNED)
def finetune_pods(**kwargs: Any) -> dict[Key, Obj]:
    """Our trainer pods by (namespace, FineTuneJob name)."""
    return {_owner_key(kwargs["namespace"], kwargs["labels"]): dict(kwargs["body"])}


def _wake(key: Key) -> None:
    event = STATE.wakeups.get(key)
    if event is not None:
        event.set()


@kopf.on.event(*JOBS, labels=OWNED)
@kopf.on.event(*PODS, labels=OWNED)
def wake(**kwargs: Any) -> None:
    """A Job or pod of ours changed: let its FineTuneJob's daemon re-derive the status now."""
    _wake(_owner_key(kwargs["namespace"], kwargs["labels"]))


def _indexed(index: kopf.Index[Key, Obj], key: Key) -> list[Obj]:
    return list(index.get(key, []))


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def validate(
    raw_spec: Obj, namespace: str, policy: Policy
) -> tuple[FineTuneJobSpec | None, list[str]]:
    """(the parsed spec, []) or (None, ['field.path: message', ...])."""
    try:
        spec = parse_spec(copy.deepcopy(raw_spec))
    except ConfigError as exc:
        return None, list(exc.errors)
    errors = check_policy(spec, namespace, policy)
    return (None, errors) if errors else (spec, [])


async def _write_status(namespace: str, name: str, old: Obj, new: Any) -> Obj | None:
    """Patch only the changed status fields; the patched status, or None when unchanged."""
    patch = status_patch(old, new)
    if not patch:
        return None
    updated = await kube().patch_finetunejob_status(namespace, name, patch)
    return dict(updated.get("status") or {})


async def _fail(body: kopf.Body, reason: str, errors: list[str], generation: int | None) -> None:
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    old = dict(body.get("status") or {})
    message = "; ".join(errors)
    new = failed_status(parse_status(old), reason, message, now_utc(), generation)
    await _write_status(namespace, name, old, new)
    kopf.warn(body, reason=reason, message=message)
    metrics.observe(namespace, name, new)


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
async def validate_spec(**kwargs: Any) -> None:
    """Reject an invalid spec once, clearly, without creating anything."""
    body: kopf.Body = kwargs["body"]
    namespace: str = kwargs["namespace"]
    logger = kwargs["logger"]
    spec, errors = validate(dict(body.get("spec") or {}), namespace, STATE.policy)
    if spec is not None:
        return
    metrics.INVALID_SPECS.inc()
    cond = get_condition(parse_status(dict(body.get("status") or {})).conditions, "Failed")
    if cond is None or cond.reason != "InvalidSpec":
        await _fail(body, "InvalidSpec", errors, body["metadata"].get("generation"))
    logger.error("invalid spec: %s", "; ".join(errors))
    raise kopf.PermanentError("invalid spec: " + "; ".join(errors))


# --------------------------------------------------------------------------------------------
# children
# --------------------------------------------------------------------------------------------
def _owned_by(obj: Obj, uid: str | None) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid for ref in refs)


async def ensure(manifest: Obj, owner_uid: str | None) -> tuple[Obj, bool]:
    """Create a child; if it exists, use it when we own it. (object, created?)."""
    kind, meta = manifest["kind"], manifest["metadata"]
    try:
        return await kube().create_child(manifest), True
    except ApiException as exc:
        if exc.status != 409:
            raise
    existing = await kube().read_child(kind, meta["namespace"], meta["name"])
    if existing is None:  # deleted in between: try again next time
        raise kopf.TemporaryError(f"{kind} {meta['name']} vanished while creating", delay=2)
    if not _owned_by(existing, owner_uid):
        raise NameConflictError(
            f"a {kind} named {meta['name']} already exists and is not owned by this "
            "FineTuneJob; rename the FineTuneJob or delete that object"
        )
    return existing, False


async def ensure_children(body: kopf.Body, spec: FineTuneJobSpec) -> tuple[Obj, bool]:
    """ConfigMap then Job (the Job mounts the ConfigMap). Returns (job, created?)."""
    meta = body["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta.get("uid")
    configmap = build_configmap(name, namespace, spec)
    job = build_job(name, namespace, spec, STATE.policy)
    kopf.adopt([configmap, job], owner=body)
    await ensure(configmap, uid)
    return await ensure(job, uid)


@kopf.on.field(*RESOURCE, field="spec.suspend")
async def suspend_changed(**kwargs: Any) -> None:
    """Suspend or resume the Job when spec.suspend changes (not at creation).

    With spec.queueName, Kueue owns admission: resuming only clears our request, and Kueue
    unsuspends the Job when its queue admits it.
    """
    old, new, body = kwargs["old"], kwargs["new"], kwargs["body"]
    namespace: str = kwargs["namespace"]
    name: str = kwargs["name"]
    logger = kwargs["logger"]
    if old is None and not new:
        return
    _wake((namespace, name))  # the reason shown in status changes even when the Job does not
    jobs = _indexed(kwargs["finetune_jobs"], (namespace, name))
    if not jobs:
        return
    if bool(jobs[0].get("spec", {}).get("suspend")) == bool(new):
        return
    if not new and (body.get("spec") or {}).get("queueName"):
        kopf.info(body, reason="Resuming", message="resume requested; Kueue admits the Job")
        return
    await kube().patch_job(namespace, job_name(name), {"spec": {"suspend": bool(new)}})
    kopf.info(
        body,
        reason="Suspending" if new else "Resuming",
        message="suspending the Job (the trainer saves a checkpoint)"
        if new
        else "resuming the Job from the last checkpoint",
    )
    logger.info("job %s suspend=%s", name, bool(new))


# --------------------------------------------------------------------------------------------
# observation: one daemon per FineTuneJob
# --------------------------------------------------------------------------------------------
@dataclass
class Observer:
    """What one FineTuneJob's daemon knows between passes."""

    body: kopf.Body
    spec: FineTuneJobSpec  # re-parsed when the raw spec changes (spec.suspend may)
    raw_spec: Obj  # what `spec` was parsed from
    status: Obj  # the status as last read or written
    created_job: Obj | None = None  # the Job we created, until the index has it

    @property
    def key(self) -> Key:
        meta = self.body["metadata"]
        return (meta["namespace"], meta["name"])

    async def step(self, jobs: list[Obj], pods: list[Obj]) -> tuple[Any, bool]:
        """One pass: create the children if needed, derive and patch the status.

        Returns (the new status, whether a trainer pod is running).
        """
        namespace, name = self.key
        generation = self.body["metadata"].get("generation")
        raw_spec = dict(self.body.get("spec") or {})
        if raw_spec != self.raw_spec:
            fresh, _ = validate(raw_spec, namespace, STATE.policy)
            self.spec = fresh or self.spec  # the training part is immutable (CEL)
            self.raw_spec = raw_spec
        spec = self.spec
        previous = parse_status(self.status)
        job = jobs[0] if jobs else self.created_job
        if jobs:
            self.created_job = None
        created = False
        if job is None and previous.phase not in TERMINAL_PHASES:
            job, created = await ensure_children(self.body, spec)
            self.created_job = job
            if created:
                kopf.info(self.body, reason="JobCreated", message=f"created Job {job_name(name)}")
                started = _created_at(self.body)
                if started is not None:
                    latency = max(0.0, (datetime.now(UTC) - started).total_seconds())
                    metrics.JOB_CREATE_LATENCY.observe(latency)
        running = [
            p
            for p in sort_pods(pods)
            if p.get("status", {}).get("phase") == "Running" and terminated_state(p) is None
        ]
        progress = None
        if running and STATE.http is not None:
            progress = await fetch_progress(STATE.http, running[-1])
        summary = latest_summary(pods)
        new = derive_status(spec, job, pods, progress, summary, previous, now_utc(), generation)
        written = await _write_status(namespace, name, self.status, new)
        if written is not None:
            self.status = written
            if not (created and new.phase not in TERMINAL_PHASES):  # JobCreated said it
                _announce(self.body, previous, new)
        metrics.observe(namespace, name, new)
        return new, bool(running)


def _created_at(obj: Mapping[str, Any]) -> datetime | None:
    stamp = obj.get("metadata", {}).get("creationTimestamp")
    if not stamp:
        return None
    try:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return None


def _announce(body: kopf.Body, previous: Any, new: Any) -> None:
    """An Event on every phase transition (after the status write succeeded)."""
    if new.phase == previous.phase or new.phase is None:
        return
    cond_type = {"Succeeded": "Succeeded", "Failed": "Failed", "Suspended": "Suspended"}.get(
        new.phase, "Running"
    )
    cond = get_condition(new.conditions, cond_type)
    reason = cond.reason if cond is not None else new.phase
    message = f"{previous.phase or 'New'} -> {new.phase}" + (
        f": {cond.message}" if cond is not None and cond.message else ""
    )
    if new.phase == "Failed":
        kopf.warn(body, reason=reason, message=message)
    else:
        kopf.info(body, reason=reason, message=message)


async def _nap(wake: asyncio.Event, stopped: kopf.DaemonStopped, seconds: float) -> None:
    """Sleep until a wake-up, the daemon's stop, or `seconds`, whichever comes first."""
    waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stopped.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


@kopf.daemon(*RESOURCE, cancellation_timeout=5.0)
async def observe(**kwargs: Any) -> None:
    """Create the children, then keep the status true until the run ends (and its TTL)."""
    stopped: kopf.DaemonStopped = kwargs["stopped"]
    body: kopf.Body = kwargs["body"]
    namespace: str = kwargs["namespace"]
    name: str = kwargs["name"]
    logger = kwargs["logger"]
    spec, _ = validate(dict(body.get("spec") or {}), namespace, STATE.policy)
    if spec is None:
        return  # the create handler reports InvalidSpec
    key = (namespace, name)
    wake = STATE.wakeups.setdefault(key, asyncio.Event())
    observer = Observer(
        body=body,
        spec=spec,
        raw_spec=dict(body.get("spec") or {}),
        status=dict(body.get("status") or {}),
    )
    interval = STATE.policy.poll_interval_seconds
    try:
        while not stopped:
            wake.clear()
            jobs = _indexed(kwargs["finetune_jobs"], key)
            pods = _indexed(kwargs["finetune_pods"], key)
            try:
                status, running = await observer.step(jobs, pods)
            except NameConflictError as exc:
                metrics.RECONCILE_ERRORS.labels(kind="NameConflict").inc()
                await _fail(body, "NameConflict", [str(exc)], body["metadata"].get("generation"))
                return
            except ApiException as exc:
                if exc.status == 404:  # the FineTuneJob is being deleted
                    return
                metrics.RECONCILE_ERRORS.labels(kind=f"Api{exc.status}").inc()
                logger.warning("reconcile of %s/%s failed, retrying: %s", *key, api_message(exc))
                await stopped.wait(interval)
                continue
            except (TimeoutError, aiohttp.ClientError, kopf.TemporaryError) as exc:
                metrics.RECONCILE_ERRORS.labels(kind=type(exc).__name__).inc()
                logger.warning("reconcile of %s/%s failed, retrying: %s", *key, exc)
                await stopped.wait(interval)
                continue
            if status.phase in TERMINAL_PHASES:
                await _expire(stopped, body, spec, status, logger)
                return
            await _nap(wake, stopped, interval if running else max(interval, RESYNC_SECONDS))
    finally:
        if STATE.wakeups.get(key) is wake:
            del STATE.wakeups[key]


async def _expire(
    stopped: kopf.DaemonStopped,
    body: kopf.Body,
    spec: FineTuneJobSpec,
    status: Any,
    logger: logging.Logger,
) -> None:
    """Delete a finished FineTuneJob after its TTL (the Job itself has no TTL: no recreate loop)."""
    if spec.ttl_seconds_after_finished is None:
        return
    finished = status.completion_time or now_utc()
    deadline = finished + timedelta(seconds=spec.ttl_seconds_after_finished)
    remaining = (deadline - now_utc()).total_seconds()
    if remaining > 0:
        await stopped.wait(remaining)
        if stopped:
            return
    meta = body["metadata"]
    logger.info("ttlSecondsAfterFinished elapsed: deleting %s/%s", meta["namespace"], meta["name"])
    await kube().delete_finetunejob(meta["namespace"], meta["name"])


@kopf.on.delete(*RESOURCE, optional=True)
async def forget(**kwargs: Any) -> None:
    """Drop metrics of a deleted FineTuneJob (its children go by garbage collection)."""
    metrics.forget(kwargs["namespace"], kwargs["name"])


def main() -> None:
    """`python -m finetune_operator.main`: the operator with the production flags.

    Standalone (no peering), cluster-wide unless FINETUNE_WATCH_NAMESPACES (comma list) is set,
    liveness at :8080/healthz, JSON logs when FINETUNE_LOG_FORMAT=json.
    """
    namespaces = [ns.strip() for ns in os.environ.get("FINETUNE_WATCH_NAMESPACES", "").split(",")]
    namespaces = [ns for ns in namespaces if ns]
    log_format = (
        kopf.LogFormat.JSON
        if os.environ.get("FINETUNE_LOG_FORMAT", "").lower() == "json"
        else kopf.LogFormat.FULL
    )
    kopf.configure(verbose=bool(os.environ.get("FINETUNE_VERBOSE")), log_format=log_format)
    kopf.run(
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=os.environ.get(
            "FINETUNE_LIVENESS_ENDPOINT", "http://0.0.0.0:8080/healthz"
        ),
    )


if __name__ == "__main__":
    main()
