"""The FineTuneJob operator: thin kopf handlers over pure builders and `derive_status`.

    kopf run --standalone --all-namespaces -m finetune_operator.main \
        --liveness=http://0.0.0.0:8080/healthz
    python -m finetune_operator.main        # the same, with those defaults

Handlers (all event handlers: none needs a finalizer, so deleting a FineTuneJob never waits for
the operator, and its children go by owner-reference garbage collection):
- indexes of the Jobs and pods labelled `finetune.dev/job` (kopf keeps them from its watch
  streams, server-side filtered by that label; only the fields the operator reads, `views`),
  and an event handler that wakes the owning
  FineTuneJob's task whenever one of them changes;
- an event handler on FineTuneJobs that runs one task per FineTuneJob (`workers`,
  `reconcile.observe`), the only writer of its status: it validates the spec (invalid: phase
  Failed, condition Failed/InvalidSpec naming the field, a Warning event), creates the
  children, suspends/resumes the Job as spec.suspend says, mirrors progress and results into
  the status and applies ttlSecondsAfterFinished.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import aiohttp
import kopf
from kubernetes_asyncio.config import ConfigException

from finetune_operator import metrics
from finetune_operator.api import GROUP, PLURAL, VERSION
from finetune_operator.builders import JOB_LABEL
from finetune_operator.kube import (
    Kube,
    connect,
    connection_info,
    in_cluster,
    load_configuration,
)
from finetune_operator.names import job_label
from finetune_operator.policy import Policy
from finetune_operator.reconcile import Runtime, observe
from finetune_operator.views import finetunejob_view, job_view, pod_view
from finetune_operator.workers import Key, Run, Workers

Obj = dict[str, Any]

# Set by earlier versions (a kopf daemon needs one); kopf removes it from every FineTuneJob it
# sees, since no handler here needs a finalizer any more.
FINALIZER = f"{GROUP}/finalizer"
RESOURCE = (GROUP, VERSION, PLURAL)
JOBS = ("batch", "v1", "jobs")
PODS = ("v1", "pods")
OWNED = {JOB_LABEL: kopf.PRESENT}
STOP_TIMEOUT_SECONDS = 5.0


@dataclass
class State:
    """Process-wide operator state, (re)initialised by the startup handler."""

    policy: Policy = field(default_factory=Policy)
    kube: Kube | None = None
    http: aiohttp.ClientSession | None = None  # for /progress: never carries API credentials
    workers: Workers = field(default_factory=Workers)
    run: Run | None = None  # a FineTuneJob's task, bound to the runtime (set on the first event)


STATE = State()


# --------------------------------------------------------------------------------------------
# start-up: every setting in one place
# --------------------------------------------------------------------------------------------
def configure(settings: kopf.OperatorSettings) -> None:
    """Kopf settings: Jobs and pods watched only when labelled as ours (server-side selector);
    the finalizer of earlier versions named, so that kopf removes it."""
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.label_selectors[JOBS] = JOB_LABEL
    settings.watching.label_selectors[PODS] = JOB_LABEL
    settings.networking.request_timeout = 60


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, logger: kopf.Logger, **_: Any) -> None:
    configure(settings)
    STATE.policy = Policy.from_env()
    STATE.kube = await connect()
    STATE.http = aiohttp.ClientSession()
    STATE.workers = Workers()
    STATE.run = None
    metrics.start()
    logger.info("policy: %s", STATE.policy.model_dump_json())


@kopf.on.login()
async def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo | None:
    """Kopf's credentials: the pod's service account (kopf re-reads the rotating token), else
    the kubeconfig as kubernetes_asyncio reads it (exec and auth-provider plugins too)."""
    if in_cluster():
        return kopf.login_with_service_account(settings=settings)
    try:
        return connection_info(await load_configuration())
    except (ConfigException, OSError) as exc:
        raise kopf.LoginError(f"no usable Kubernetes credentials: {exc}") from exc


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    await STATE.workers.stop_all(STOP_TIMEOUT_SECONDS)
    STATE.run = None
    if STATE.kube is not None:
        await STATE.kube.close()
        STATE.kube = None
    if STATE.http is not None:
        await STATE.http.close()
        STATE.http = None


# --------------------------------------------------------------------------------------------
# what the watch streams tell us about our Jobs and pods
# --------------------------------------------------------------------------------------------
def _owner_key(namespace: str | None, labels: kopf.Labels) -> Key:
    return (namespace or "", labels[JOB_LABEL])


@kopf.index(*JOBS, labels=OWNED)
async def finetune_jobs(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Key, Obj]:
    """Our batch/v1 Jobs by (namespace, `finetune.dev/job` label), as views."""
    return {_owner_key(namespace, labels): job_view(body)}


@kopf.index(*PODS, labels=OWNED)
async def finetune_pods(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Key, Obj]:
    """Our trainer pods by (namespace, `finetune.dev/job` label), as views."""
    return {_owner_key(namespace, labels): pod_view(body)}


@kopf.on.event(*JOBS, labels=OWNED)
@kopf.on.event(*PODS, labels=OWNED)
async def wake(namespace: str | None, labels: kopf.Labels, **_: Any) -> None:
    """A Job or pod of ours changed: let its FineTuneJob's task re-derive the status now."""
    STATE.workers.wake(_owner_key(namespace, labels))


# --------------------------------------------------------------------------------------------
# FineTuneJobs
# --------------------------------------------------------------------------------------------
# kopf passes indexes by name as extra kwargs, which its handler protocols type as **kwargs only
@kopf.on.event(*RESOURCE)  # type: ignore[arg-type]
async def track(
    event: kopf.RawEvent,
    body: kopf.Body,
    namespace: str | None,
    name: str,
    finetune_jobs: kopf.Index[Key, Obj],
    finetune_pods: kopf.Index[Key, Obj],
    **_: Any,
) -> None:
    """Run one task per FineTuneJob (`reconcile.observe`) from its watch events; stop it when
    the FineTuneJob is deleted (or being deleted)."""
    key = (namespace or "", job_label(name))
    if event["type"] == "DELETED" or body.get("metadata", {}).get("deletionTimestamp"):
        STATE.workers.forget(key)
        if event["type"] == "DELETED":
            metrics.forget(key[0], name)
        return
    if STATE.run is None:
        if STATE.kube is None or STATE.http is None:
            return  # shutting down
        runtime = Runtime(STATE.policy, STATE.kube, STATE.http, finetune_jobs, finetune_pods)
        STATE.run = partial(observe, runtime=runtime)
    STATE.workers.observe(key, kopf.Body(cast(kopf.RawBody, finetunejob_view(body))), STATE.run)


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
