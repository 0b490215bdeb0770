"""The FineTuneJob operator: thin kopf handlers over pure builders and `derive_status`.

    kopf run --standalone --all-namespaces -m finetune_operator.main \
        --liveness=http://0.0.0.0:8080/healthz
    python -m finetune_operator.main        # the same, with those defaults

Handlers:
- create/resume: validate the spec and the platform policy. Invalid -> phase Failed, condition
  Failed/InvalidSpec naming the field, a Warning event, `kopf.PermanentError` (no retries).
- a daemon per valid FineTuneJob (the only writer of its status): ensures the ConfigMap and the
  Job exist (idempotent, owner-checked), then every FINETUNE_POLL_INTERVAL_SECONDS observes the
  Job, its pods and the trainer's /progress, derives the status and patches only what changed;
  once finished, waits out `ttlSecondsAfterFinished` and deletes the FineTuneJob.
- spec.suspend changes: suspend / resume the Job.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import kopf

from finetune_operator import metrics
from finetune_operator.api import GROUP, PLURAL, VERSION, ConfigError, FineTuneJobSpec, parse_spec
from finetune_operator.builders import build_configmap, build_job, job_name
from finetune_operator.kube import (
    ApiError,
    Kube,
    custom_path,
    fetch_progress,
    jobs_path,
    path_for,
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
log = logging.getLogger("finetune_operator")

FINALIZER = f"{GROUP}/finalizer"
RESOURCE = (GROUP, VERSION, PLURAL)


@dataclass
class State:
    """Process-wide operator state, (re)initialised by the startup handler."""

    policy: Policy = field(default_factory=Policy)
    kube: Kube | None = None
    http: aiohttp.ClientSession | None = None  # for /progress: never carries API credentials


STATE = State()


class NameConflictError(Exception):
    """A child's name is taken by an object that this FineTuneJob does not own."""


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def kube() -> Kube:
    if STATE.kube is None:
        raise kopf.TemporaryError("the operator is not logged in yet", delay=5)
    return STATE.kube


# --------------------------------------------------------------------------------------------
# start-up: every setting in one place
# --------------------------------------------------------------------------------------------
def configure(settings: kopf.OperatorSettings) -> None:
    """Kopf settings: bookkeeping in finetune.dev annotations, never in the public status."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60


@kopf.on.startup()
async def startup(**kwargs: Any) -> None:
    settings: kopf.OperatorSettings = kwargs["settings"]
    logger = kwargs["logger"]
    configure(settings)
    STATE.policy = Policy.from_env()
    STATE.kube = Kube(_login(settings))
    STATE.http = aiohttp.ClientSession()
    metrics.start()
    logger.info("policy: %s", STATE.policy.model_dump_json())


def _login(settings: kopf.OperatorSettings) -> Any:
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(
        settings=settings
    )
    if info is None:
        raise kopf.LoginError("no Kubernetes credentials (no service account, no kubeconfig)")
    return info


@kopf.on.login()
def login(**kwargs: Any) -> Any:
    return _login(kwargs["settings"])


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if STATE.kube is not None:
        await STATE.kube.close()
        STATE.kube = None
    if STATE.http is not None:
        await STATE.http.close()
        STATE.http = None


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


async def _write_status(namespace: str, name: str, old: Obj, new: Any) -> bool:
    patch = status_patch(old, new)
    if not patch:
        return False
    await kube().patch(custom_path(namespace, name, "status"), {"status": patch})
    return True


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
    name = manifest["metadata"]["name"]
    try:
        return await kube().create(path_for(manifest), manifest), True
    except ApiError as exc:
        if exc.status != 409:
            raise
    existing = await kube().get_or_none(path_for(manifest, name))
    if existing is None:  # deleted in between: try again next time
        raise kopf.TemporaryError(f"{manifest['kind']} {name} vanished while creating", delay=2)
    if not _owned_by(existing, owner_uid):
        raise NameConflictError(
            f"a {manifest['kind']} named {name} already exists and is not owned by this "
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
    """Suspend or resume the Job when spec.suspend changes (not at creation)."""
    old, new, body = kwargs["old"], kwargs["new"], kwargs["body"]
    namespace: str = kwargs["namespace"]
    name: str = kwargs["name"]
    logger = kwargs["logger"]
    if old is None and not new:
        return
    job = await kube().get_or_none(jobs_path(namespace, job_name(name)))
    if job is None:
        return
    if bool(job.get("spec", {}).get("suspend")) == bool(new):
        return
    await kube().patch(jobs_path(namespace, job_name(name)), {"spec": {"suspend": bool(new)}})
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
async def observe_once(
    body: kopf.Body, spec: FineTuneJobSpec, *, create: bool
) -> tuple[Obj | None, Any]:
    """One reconcile pass: (the current FineTuneJob, its new status) or (None, None) if gone."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    current = await kube().get_or_none(custom_path(namespace, name))
    if current is None or current.get("metadata", {}).get("deletionTimestamp"):
        return None, None
    old_raw = dict(current.get("status") or {})
    fresh, _ = validate(dict(current.get("spec") or {}), namespace, STATE.policy)
    spec = fresh or spec  # spec.suspend may change; the training part is immutable
    previous = parse_status(old_raw)
    generation = current.get("metadata", {}).get("generation")
    job = await kube().get_or_none(jobs_path(namespace, job_name(name)))
    if job is None and create and previous.phase not in TERMINAL_PHASES:
        job, created = await ensure_children(body, spec)
        if created:
            kopf.info(body, reason="JobCreated", message=f"created Job {job_name(name)}")
            started = _created_at(current)
            if started is not None:
                metrics.JOB_CREATE_LATENCY.observe(max(0.0, (now_utc() - started).total_seconds()))
    pods = await kube().job_pods(namespace, name) if job is not None else []
    progress = None
    running = [
        p
        for p in sort_pods(pods)
        if p.get("status", {}).get("phase") == "Running" and terminated_state(p) is None
    ]
    if running and STATE.http is not None:
        progress = await fetch_progress(STATE.http, running[-1])
    summary = latest_summary(pods)
    new = derive_status(spec, job, pods, progress, summary, previous, now_utc(), generation)
    if await _write_status(namespace, name, old_raw, new):
        _announce(body, previous, new)
    metrics.observe(namespace, name, new)
    return current, new


def _created_at(obj: Obj) -> datetime | None:
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
    interval = STATE.policy.poll_interval_seconds
    while not stopped:
        try:
            current, status = await observe_once(body, spec, create=True)
        except NameConflictError as exc:
            metrics.RECONCILE_ERRORS.labels(kind="NameConflict").inc()
            await _fail(body, "NameConflict", [str(exc)], body["metadata"].get("generation"))
            return
        except (TimeoutError, ApiError, aiohttp.ClientError, kopf.TemporaryError) as exc:
            metrics.RECONCILE_ERRORS.labels(kind=type(exc).__name__).inc()
            logger.warning("reconcile of %s/%s failed, retrying: %s", namespace, name, exc)
            await stopped.wait(interval)
            continue
        if current is None:
            return
        if status.phase in TERMINAL_PHASES:
            await _expire(stopped, body, spec, status, logger)
            return
        await stopped.wait(interval)


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
    await kube().delete(custom_path(meta["namespace"], meta["name"]))


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
