"""A Kubernetes API (kmock's KubernetesEmulator) plus the parts kmock lacks, for the operator.

- `Cluster`: the emulator on a real HTTP port, in its own thread and event loop, with the
  resources the operator and kopf touch declared for discovery, a kubeconfig pointing at it,
  and sync helpers for tests (`get`, `create`, `patch`, `delete`, `wait_for`). Like a real API
  server it refuses (422) children that break the name and label rules (`apiserver_rules`),
  and `emulator.faults` injects errors (403, 500, ...) into the operator's requests.
- `Kubelet`: what the Job controller, the kubelet and the garbage collector would do. It
  creates the pod a Job asks for and runs the pod's command as a local process (the real
  trainer, or a stand-in) in a file system of its own: exactly the volumes the pod spec mounts
  (each PVC its claim's directory under `pvc_root`, the ConfigMap's keys as files, emptyDirs),
  with every absolute path in the container's env pointing into it, so a missing mount fails
  the run. The progress port becomes a free local port (the pod's containerPort and podIP
  127.0.0.1 are patched so the operator polls the local process); then it writes pod phase,
  the trainer's terminated state (exit code, the message from the pod's
  terminationMessagePath) and the Job's status back, applying the Job's own podFailurePolicy,
  backoffLimit, activeDeadlineSeconds and suspend (SIGTERM, pod deleted, Suspended condition).
  `Kubelet.fates` makes a Job's pods unschedulable, stuck pulling the image, or OOM-killed.
  An Indexed Job gets one pod per index (hostname `<Job>-<index>`, JOB_COMPLETION_INDEX, the
  index annotation), all on loopback: pod 0's DNS name resolves to 127.0.0.1 and its
  rendezvous port is one free local port; it succeeds when every index has.
"""

from __future__ import annotations

import asyncio
import collections
import os
import secrets
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import aiohttp.web
import apiserver_rules
import kmock
from finetune_operator.api import API_VERSION, KIND, PLURAL
from finetune_operator.builders import CONTAINER_NAME, PROGRESS_PORT_NAME
from finetune_operator.status import COMPLETION_INDEX_ANNOTATION as COMPLETION_INDEX
from finetune_trainer.progress import (
    ENV_JOB_COMPLETION_INDEX,
    ENV_MASTER_ADDR,
    ENV_MASTER_PORT,
    ENV_PROGRESS_PORT,
)
from kopf.testing import KopfRunner
from rest import Rest, core_path, custom_path, jobs_path

T = TypeVar("T")
Obj = dict[str, Any]
REPO_ROOT = Path(__file__).resolve().parents[2]

RESOURCES: dict[str, dict[str, Any]] = {
    "v1/namespaces": {"kind": "Namespace", "namespaced": False},
    "v1/events": {"kind": "Event", "namespaced": True},
    "v1/configmaps": {"kind": "ConfigMap", "namespaced": True},
    "v1/services": {"kind": "Service", "namespaced": True},
    "v1/secrets": {"kind": "Secret", "namespaced": True},
    "v1/pods": {"kind": "Pod", "namespaced": True, "subresources": ["status", "log"]},
    "batch/v1/jobs": {"kind": "Job", "namespaced": True, "subresources": ["status"]},
    "events.k8s.io/v1/events": {"kind": "Event", "namespaced": True},
    "apiextensions.k8s.io/v1/customresourcedefinitions": {
        "kind": "CustomResourceDefinition",
        "namespaced": False,
    },
    f"{API_VERSION}/{PLURAL}": {
        "kind": KIND,
        "namespaced": True,
        "subresources": ["status"],
        "shortnames": ["ftj"],
        "categories": ["finetune"],
    },
}
VERBS = ["get", "list", "watch", "create", "update", "patch", "delete"]

# Pod states for Kubelet.fates: what the scheduler / kubelet report when the trainer cannot run.
POD_FATES: dict[str, dict[str, Any]] = {
    "unschedulable": {
        "phase": "Pending",
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
            }
        ],
    },
    "image-pull": {
        "phase": "Pending",
        "conditions": [{"type": "PodScheduled", "status": "True"}],
        "containerStatuses": [
            {
                "name": CONTAINER_NAME,
                "ready": False,
                "restartCount": 0,
                "state": {
                    "waiting": {
                        "reason": "ImagePullBackOff",
                        "message": 'Back-off pulling image "registry.invalid/trainer:nope"',
                    }
                },
            }
        ],
    },
    "oom": {
        "phase": "Failed",
        "containerStatuses": [
            {
                "name": CONTAINER_NAME,
                "ready": False,
                "restartCount": 0,
                "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
            }
        ],
    },
}


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def in_root(root: Path, path: str) -> Path:
    """Where a container's absolute `path` is in its file system rooted at `root`."""
    return root / path.lstrip("/")


def failure_policy_action(job: Obj, exit_code: int) -> tuple[str | None, int | None]:
    """The Job's podFailurePolicy verdict on a trainer exit code: (action, rule index), as the
    Job controller applies it (the first rule whose onExitCodes match), or (None, None)."""
    rules = (job["spec"].get("podFailurePolicy") or {}).get("rules") or []
    for index, rule in enumerate(rules):
        codes = rule.get("onExitCodes")
        if codes is None:
            continue
        matched = exit_code in codes["values"]
        if matched == (codes["operator"] == "In"):
            return rule["action"], index
    return None, None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


HARNESS_AGENT = "finetune-test-harness"
REQUEST_LOG = 2

# Emulator replaces this private kmock method; if kmock renames it, the override would silently
# stop applying (and the scan it speeds up would come back), so fail loudly instead.
if not callable(getattr(kmock.KubernetesEmulator, "_KubernetesEmulator__get_objs", None)):
    raise ImportError(
        f"kmock {getattr(kmock, '__version__', '?')}: KubernetesEmulator.__get_objs is gone; "
        "update Emulator._KubernetesEmulator__get_objs in tests/integration/harness.py"
    )


def status_response(code: int, reason: str, message: str) -> aiohttp.web.Response:
    """An API server's error answer (a metav1.Status)."""
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return aiohttp.web.json_response(body, status=code)


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator plus what an API server adds: on create, name from generateName,
    uid, resourceVersion and creationTimestamp (kopf's events use generateName); on a spec
    change, metadata.generation + 1; and on create, the API server's refusal (422 Invalid,
    with its message) of a ConfigMap, Job or pod that breaks its name and label rules
    (`apiserver_rules`), which kmock itself would store.

    `faults[("CREATE", "jobs")] = (403, "Forbidden", "exceeded quota: ...")` answers the
    operator's requests of that verb and resource with that error until removed.

    It also counts the requests of everyone but the harness (and `ignored_agents`) as
    'VERB resource[/subresource]' in `counts`, and keeps only the tail of kmock's request
    log, which kmock matches each new request against (quadratic in the run's length).
    """

    ignored_agents: frozenset[str] = frozenset({HARNESS_AGENT})
    validated_kinds: frozenset[str] = frozenset({"configmaps", "jobs", "pods"})

    @property
    def faults(self) -> dict[tuple[str, str], tuple[int, str, str]]:
        found: dict[tuple[str, str], tuple[int, str, str]] = self.__dict__.setdefault("_faults", {})
        return found

    def refusal(self, request: Any) -> aiohttp.web.Response | None:
        """The error a real API server would answer instead of doing the request, if any."""
        plural = getattr(request.resource, "plural", None)
        action = getattr(request.action, "name", None)
        if request.headers.get("User-Agent") != HARNESS_AGENT:
            fault = self.faults.get((str(action), str(plural)))
            if fault is not None:
                return status_response(*fault)
        if action != "CREATE" or plural not in self.validated_kinds:
            return None
        if not isinstance(request.data, dict) or not (
            errors := apiserver_rules.problems(request.data)
        ):
            return None
        kind, name = request.data.get("kind"), request.data.get("metadata", {}).get("name")
        return status_response(422, "Invalid", f'{kind} "{name}" is invalid: {", ".join(errors)}')

    def count(self, request: Any) -> None:
        counts: collections.Counter[str] = self.__dict__.setdefault("counts", collections.Counter())
        if request.headers.get("User-Agent") in self.ignored_agents:
            return
        what = getattr(request.resource, "plural", None) or str(request.url.path)
        if request.subresource:
            what += "/" + request.subresource
        counts[f"{getattr(request.action, 'name', None) or request.method} {what}"] += 1

    def _KubernetesEmulator__get_objs(self, request: Any, strict: bool) -> list[Any]:  # noqa: N802
        """kmock's private object lookup, same semantics, without a method call per stored
        object: every request scans all objects, so its cost otherwise dominates at N=1000."""
        name, namespace, resource = request.name, request.namespace, request.resource
        found = []
        for (res, ns, n), obj in self._objects.items():
            if name is not None and n != name:
                continue
            if (ns != namespace) if strict else (namespace is not None and ns != namespace):
                continue
            if res == resource:
                found.append(obj)
        return found

    async def _handle(self, request: Any) -> Any:
        # kmock matches each request against its routes by re-filtering the request log; the
        # request being handled is the last one, so a short tail is all the matching needs
        if len(self._requests) > 2 * REQUEST_LOG:
            del self._requests[:-REQUEST_LOG]
        self.count(request)
        if (refused := self.refusal(request)) is not None:
            return refused
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + secrets.token_hex(4)
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("resourceVersion", "1")
            meta.setdefault("creationTimestamp", now_iso())
        elif (
            request.action == kmock.action.UPDATE
            and not request.subresource
            and isinstance(request.data, dict)
            and "spec" in request.data
        ):
            # a spec change bumps metadata.generation (what observedGeneration refers to)
            current = self._KubernetesEmulator__get_objs(request, strict=True)
            if current:
                generation = int(current[0].last.raw.get("metadata", {}).get("generation") or 0)
                request.data.setdefault("metadata", {})["generation"] = generation + 1
        return await super()._handle(request)


class Cluster:
    """kmock's KubernetesEmulator serving HTTP from a background thread."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.emulator: Any = None
        self._server: Any = None
        self.kube: Rest | None = None
        self.url = ""
        self.kubeconfig = tmp / "kubeconfig"

    def __enter__(self) -> Cluster:
        self._thread.start()
        self.call(self._start())
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: kmock\n"
            f"clusters: [{{name: kmock, cluster: {{server: '{self.url}'}}}}]\n"
            "users: [{name: kmock, user: {token: kmock}}]\n"
            "contexts: [{name: kmock, context: {cluster: kmock, user: kmock, namespace: default}}]\n"
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)

    async def _start(self) -> None:
        self.emulator = Emulator()
        await self.emulator.__aenter__()
        self._server = kmock.Server(self.emulator)
        await self._server.__aenter__()
        for key, info in RESOURCES.items():
            self.emulator.resources[key] = {"verbs": VERBS, **info}
        self.url = str(self._server.url).rstrip("/")
        self.kube = Rest(self.url, user_agent=HARNESS_AGENT)

    async def _stop(self) -> None:
        if self.kube is not None:
            await self.kube.close()
        await self._server.__aexit__(None, None, None)
        await self.emulator.__aexit__(None, None, None)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run a coroutine in the emulator's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    # ---- sync REST helpers ---------------------------------------------------------------
    @property
    def api(self) -> Rest:
        assert self.kube is not None
        return self.kube

    def get(self, path: str) -> Obj | None:
        return self.call(self.api.get_or_none(path))

    def items(self, path: str) -> list[Obj]:
        return list(self.call(self.api.get(path)).get("items") or [])

    def create(self, path: str, body: Obj) -> Obj:
        return self.call(self.api.create(path, body))

    def patch(self, path: str, body: Obj) -> Obj:
        return self.call(self.api.patch(path, body))

    def delete(self, path: str) -> Obj | None:
        return self.call(self.api.delete(path))

    def apply_ftj(self, name: str, spec: Obj, namespace: str = "default") -> Obj:
        """Create a FineTuneJob with what the API server would add (uid, generation, time)."""
        return self.create(
            custom_path(namespace),
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "uid": str(uuid.uuid4()),
                    "generation": 1,
                    "resourceVersion": "1",
                    "creationTimestamp": now_iso(),
                },
                "spec": spec,
            },
        )

    def ftj(self, name: str, namespace: str = "default") -> Obj | None:
        return self.get(custom_path(namespace, name))

    def job(self, name: str, namespace: str = "default") -> Obj | None:
        return self.get(jobs_path(namespace, name))

    def pods(self, name: str, namespace: str = "default") -> list[Obj]:
        return self.call(self.api.job_pods(namespace, name))

    def events(self, name: str, namespace: str = "default") -> list[Obj]:
        return [
            e
            for e in self.items(core_path(namespace, "events"))
            if (e.get("involvedObject") or {}).get("name") == name
        ]

    def count(self, resource: str, namespace: str, name: str) -> int:
        """How many times an object was created (from the emulator's history)."""

        async def _count() -> int:
            res = kmock.resource(resource)
            total = 0
            for (r, ns, n), obj in list(self.emulator.objects.items()):
                if r == res and ns == namespace and n == name:
                    history = [v for v in obj.history]
                    total += sum(
                        1
                        for prev, cur in zip([None, *history], history, strict=False)
                        if prev is None and cur is not None
                    )
            return total

        return self.call(_count())

    def wait_for(
        self, check: Callable[[], T], timeout: float = 30, interval: float = 0.1, what: str = ""
    ) -> T:
        """Poll `check` until it returns something truthy."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = check()
            except Exception as exc:  # a transient read error: try again
                last = exc
            if last and not isinstance(last, Exception):
                return cast(T, last)
            time.sleep(interval)
        raise AssertionError(f"timed out waiting for {what or check}: last={last!r}")


@dataclass
class Slot:
    """One index of a Job (the only one of a non-indexed Job): its current pod and process."""

    index: int
    pod: str | None = None
    proc: asyncio.subprocess.Process | None = None
    term_file: Path | None = None
    log_file: Path | None = None
    stopping: bool = False
    succeeded: bool = False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def exited(self) -> bool:
        return self.proc is not None and self.proc.returncode is not None and self.pod is not None


@dataclass
class Run:
    """One Job as the Job controller and the kubelet see it."""

    namespace: str
    name: str
    uid: str
    started: float | None = None
    failed: int = 0
    attempt: int = 0
    slots: dict[int, Slot] = field(default_factory=dict)
    rendezvous_port: int = 0  # pod 0's PET_MASTER_PORT, on loopback
    deadline_exceeded: bool = False
    done: bool = False

    def slot(self, index: int) -> Slot:
        return self.slots.setdefault(index, Slot(index))

    @property
    def running(self) -> list[Slot]:
        return [s for s in self.slots.values() if s.running]


def completions(job: Obj) -> int:
    """Pods the Job needs to succeed (one per index of an Indexed Job)."""
    return int(job.get("spec", {}).get("completions") or 1)


def indexed(job: Obj) -> bool:
    return bool(job.get("spec", {}).get("completionMode") == "Indexed")


@dataclass
class Kubelet:
    """Job controller + kubelet + garbage collector for the emulator (see module docstring)."""

    cluster: Cluster
    tmp: Path
    command: list[str] | None = None  # override of the pod's command (e.g. the fake trainer)
    env: dict[str, str] = field(default_factory=dict)  # extra env for the trainer process
    fates: dict[str, str] = field(default_factory=dict)  # Job name -> a POD_FATES key
    interval: float = 0.1
    runs: dict[tuple[str, str], Run] = field(default_factory=dict)
    pvc_root: Path = field(init=False)  # the claims' storage: claim NAME is pvc_root/NAME
    _task: Any = None
    _stop: bool = False
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pvc_root = self.tmp / "pvc"
        self.pvc_root.mkdir(parents=True, exist_ok=True)

    def start(self) -> Kubelet:
        self._task = asyncio.run_coroutine_threadsafe(self._loop(), self.cluster.loop)
        return self

    def stop(self) -> None:
        self._stop = True
        if self._task is not None:
            try:
                self._task.result(30)
            except Exception as exc:
                self.errors.append(repr(exc))
        for run in self.runs.values():
            for slot in run.running:
                slot.proc.kill()  # type: ignore[union-attr]

    @property
    def api(self) -> Rest:
        return self.cluster.api

    async def _loop(self) -> None:
        while not self._stop:
            try:
                await self._tick()
            except Exception as exc:
                self.errors.append(repr(exc))
            await asyncio.sleep(self.interval)
        for run in self.runs.values():
            await self._kill(run)

    async def _tick(self) -> None:
        await self._collect_garbage()
        jobs = (await self.api.get("/apis/batch/v1/jobs")).get("items") or []
        seen = set()
        for job in jobs:
            meta = job["metadata"]
            key = (meta["namespace"], meta["name"])
            seen.add(key)
            if key not in self.runs:
                uid = meta.get("uid") or str(uuid.uuid4())
                if not meta.get("uid"):
                    await self.api.patch(
                        jobs_path(*key),
                        {"metadata": {"uid": uid, "creationTimestamp": now_iso()}},
                    )
                self.runs[key] = Run(namespace=key[0], name=key[1], uid=uid)
            await self._sync(self.runs[key], job)
        for key, run in list(self.runs.items()):
            if key not in seen:  # Job deleted: its pods go too
                await self._kill(run)
                for pod in await self._pods(run):
                    await self.api.delete(core_path(run.namespace, "pods", pod["metadata"]["name"]))
                del self.runs[key]

    async def _collect_garbage(self) -> None:
        """Delete Jobs, ConfigMaps, Services and pods whose owner is gone (the GC's job)."""
        owners: set[str] = set()
        kinds = ("/apis/batch/v1/jobs", "/api/v1/configmaps", "/api/v1/services", "/api/v1/pods")
        for kind_path in kinds:
            items = (await self.api.get(kind_path)).get("items") or []
            for obj in items:
                refs = obj["metadata"].get("ownerReferences") or []
                if not refs:
                    continue
                if not owners:
                    owners = await self._owner_uids()
                if not any(ref.get("uid") in owners for ref in refs):
                    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
                    path = {
                        "/apis/batch/v1/jobs": jobs_path(ns, name),
                        "/api/v1/configmaps": core_path(ns, "configmaps", name),
                        "/api/v1/services": core_path(ns, "services", name),
                        "/api/v1/pods": core_path(ns, "pods", name),
                    }[kind_path]
                    await self.api.delete(path)

    async def _owner_uids(self) -> set[str]:
        uids = {"-"}
        for path in (custom_path(None), "/apis/batch/v1/jobs"):
            for obj in (await self.api.get(path)).get("items") or []:
                if not obj["metadata"].get("deletionTimestamp") or path != custom_path(None):
                    uids.add(obj["metadata"].get("uid"))
        return uids

    async def _pods(self, run: Run) -> list[Obj]:
        items = (await self.api.get(core_path(run.namespace, "pods"))).get("items") or []
        return [p for p in items if (p["metadata"].get("labels") or {}).get("job-name") == run.name]

    async def _job_status(self, run: Run, status: Obj) -> None:
        await self.api.patch(jobs_path(run.namespace, run.name), {"status": status})

    @staticmethod
    def _cond(type_: str, status: str = "True", reason: str = "", message: str = "") -> Obj:
        return {
            "type": type_,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": now_iso(),
            "lastProbeTime": now_iso(),
        }

    def _signal_all(self, run: Run, sig: int) -> None:
        for slot in run.running:
            slot.stopping = True
            slot.proc.send_signal(sig)  # type: ignore[union-attr]

    async def _sync(self, run: Run, job: Obj) -> None:
        if run.done:
            return
        spec = job.get("spec") or {}
        status = job.get("status") or {}
        for slot in list(run.slots.values()):
            if slot.exited:
                await self._exited(run, slot, job)
                if run.done:
                    return
        if spec.get("suspend"):
            if run.running:
                if not any(s.stopping for s in run.running):
                    self._signal_all(run, signal.SIGTERM)
                return  # their exits are handled (pods deleted) when they end
            if not any(c.get("type") == "Suspended" for c in status.get("conditions") or []):
                await self._job_status(
                    run,
                    {
                        "active": 0,
                        "conditions": [
                            self._cond("Suspended", reason="JobSuspended", message="Job suspended")
                        ],
                    },
                )
            return
        deadline = spec.get("activeDeadlineSeconds")
        if run.running and deadline and run.started and time.monotonic() - run.started > deadline:
            run.deadline_exceeded = True
            self._signal_all(run, signal.SIGTERM)
            return
        if any(s.stopping for s in run.running):
            return
        fate = self.fates.get(run.name)
        for index in range(completions(job)):
            slot = run.slot(index)
            if slot.succeeded or slot.running:
                continue
            if fate is None:
                await self._start_pod(run, slot, job)
            elif slot.pod is None or fate == "oom":
                await self._fated_pod(run, slot, job, fate)

    async def _fated_pod(self, run: Run, slot: Slot, job: Obj, fate: str) -> None:
        """A pod that never runs the trainer: stuck Pending, or OOM-killed (counted by the
        Job controller against backoffLimit)."""
        pod_name = await self._create_pod(run, slot, job, dict(job["spec"]["template"]["spec"]))
        await self.api.patch(
            core_path(run.namespace, "pods", pod_name), {"status": POD_FATES[fate]}
        )
        if fate == "oom":
            await self._pod_failed(run, int(job["spec"].get("backoffLimit", 6)))

    async def _fail_job(self, run: Run, failed: int, reason: str, message: str) -> None:
        """The Job controller's final Failed condition (the pods still running are killed)."""
        run.done = True
        await self._kill(run)
        await self._job_status(
            run,
            {
                "active": 0,
                "failed": failed,
                "conditions": [self._cond("Failed", reason=reason, message=message)],
            },
        )

    async def _pod_failed(self, run: Run, backoff: int) -> None:
        """A pod failure that counts against backoffLimit: a new pod, or the Job fails."""
        run.failed += 1
        if run.failed > backoff:
            await self._fail_job(
                run,
                run.failed,
                "BackoffLimitExceeded",
                "Job has reached the specified backoff limit",
            )
        else:
            await self._job_status(run, {"active": len(run.running), "failed": run.failed})

    async def _start_pod(self, run: Run, slot: Slot, job: Obj) -> None:
        template = job["spec"]["template"]
        pod_spec = dict(template["spec"])
        container = dict(pod_spec["containers"][0])
        port = free_port()
        container["ports"] = [
            {**p, "containerPort": port} if p.get("name") == PROGRESS_PORT_NAME else p
            for p in container.get("ports") or []
        ]
        pod_spec["containers"] = [container, *pod_spec["containers"][1:]]
        if indexed(job):
            pod_spec["hostname"] = f"{run.name}-{slot.index}"  # as the Job controller does
        pod_name = await self._create_pod(run, slot, job, pod_spec)
        if run.started is None:
            run.started = time.monotonic()
            await self._job_status(run, {"startTime": now_iso(), "active": 1})
        else:
            await self._job_status(run, {"active": len(run.running) + 1, "conditions": []})

        work = self.tmp / f"{run.namespace}-{pod_name}"
        root = work / "root"
        await self._mount(run, pod_spec, container, root)
        env = await self._env(run, container, root)
        env[ENV_PROGRESS_PORT] = str(port)  # the port's number changed with the containerPort
        if indexed(job):
            env.update(self._group_env(run, slot))
        command = list(self.command or container["command"])
        if command[0] == "python":
            command[0] = sys.executable
        slot.term_file = in_root(root, container["terminationMessagePath"])
        slot.term_file.parent.mkdir(parents=True, exist_ok=True)
        slot.log_file = work / "log.txt"
        with slot.log_file.open("wb") as log:
            slot.proc = await asyncio.create_subprocess_exec(
                *command, env=env, cwd=str(REPO_ROOT), stdout=log, stderr=log
            )
        await self.api.patch(
            core_path(run.namespace, "pods", pod_name),
            {
                "status": {
                    "phase": "Running",
                    "podIP": "127.0.0.1",
                    "startTime": now_iso(),
                    "conditions": [{"type": "PodScheduled", "status": "True"}],
                    "containerStatuses": [
                        {
                            "name": container["name"],
                            "ready": True,
                            "restartCount": 0,
                            "state": {"running": {"startedAt": now_iso()}},
                        }
                    ],
                }
            },
        )

    def _group_env(self, run: Run, slot: Slot) -> dict[str, str]:
        """An Indexed Job's pod: its index from the Job controller, and pod 0's DNS name as
        cluster DNS would resolve it: every pod here is on loopback, so pod 0's rendezvous
        port is one free port of this machine, the same for every pod of the Job."""
        if not run.rendezvous_port or not any(s.running for s in run.slots.values()):
            run.rendezvous_port = free_port()  # a new group: a fresh port
        return {
            ENV_JOB_COMPLETION_INDEX: str(slot.index),
            ENV_MASTER_ADDR: "127.0.0.1",
            ENV_MASTER_PORT: str(run.rendezvous_port),
        }

    async def _create_pod(self, run: Run, slot: Slot, job: Obj, pod_spec: Obj) -> str:
        """Create the Job's next pod (Pending) as the Job controller would; its name."""
        template = job["spec"]["template"]
        run.attempt += 1
        prefix = f"{run.name}-{slot.index}" if indexed(job) else run.name
        pod_name = f"{prefix}-{secrets.token_hex(3)}"
        labels = {
            **(template.get("metadata", {}).get("labels") or {}),
            "job-name": run.name,
            "controller-uid": run.uid,
            "batch.kubernetes.io/job-name": run.name,
            "batch.kubernetes.io/controller-uid": run.uid,
        }
        annotations = {}
        if indexed(job):
            annotations[COMPLETION_INDEX] = str(slot.index)
            labels[COMPLETION_INDEX] = str(slot.index)
        await self.api.create(
            core_path(run.namespace, "pods"),
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": pod_name,
                    "namespace": run.namespace,
                    "uid": str(uuid.uuid4()),
                    "creationTimestamp": now_iso(),
                    "labels": labels,
                    "annotations": annotations,
                    "ownerReferences": [
                        {
                            "apiVersion": "batch/v1",
                            "kind": "Job",
                            "name": run.name,
                            "uid": run.uid,
                            "controller": True,
                        }
                    ],
                },
                "spec": pod_spec,
                "status": {"phase": "Pending"},
            },
        )
        slot.pod = pod_name
        return pod_name

    async def _mount(self, run: Run, pod_spec: Obj, container: Obj, root: Path) -> None:
        """The container's file system under `root`: exactly the volumes the pod spec mounts
        (a PVC is its claim's directory under `pvc_root`, a ConfigMap its keys as files, an
        emptyDir a fresh directory). A claim the pod does not mount is not there."""
        volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
        for mount in container.get("volumeMounts") or []:
            volume = volumes[mount["name"]]
            target = in_root(root, mount["mountPath"])
            target.parent.mkdir(parents=True, exist_ok=True)
            if claim := volume.get("persistentVolumeClaim"):
                storage = self.pvc_root / claim["claimName"]
                storage.mkdir(parents=True, exist_ok=True)
                target.symlink_to(storage, target_is_directory=True)
            elif config_map := volume.get("configMap"):
                target.mkdir()
                cm = await self.api.get(core_path(run.namespace, "configmaps", config_map["name"]))
                for key, value in (cm.get("data") or {}).items():
                    (target / key).write_text(value)
            else:
                target.mkdir()

    async def _env(self, run: Run, container: Obj, root: Path) -> dict[str, str]:
        """The container's environment; absolute paths point into its file system at `root`."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FINETUNE_", "PET_"))}
        for item in container.get("env") or []:
            if "value" in item:
                value = item["value"]
                env[item["name"]] = str(in_root(root, value)) if value.startswith("/") else value
            elif ref := (item.get("valueFrom") or {}).get("secretKeyRef"):
                secret = await self.api.get_or_none(
                    core_path(run.namespace, "secrets", ref["name"])
                )
                if secret and ref["key"] in (secret.get("stringData") or {}):
                    env[item["name"]] = secret["stringData"][ref["key"]]
        return {**env, "HF_HUB_OFFLINE": "1", **self.env}

    async def _kill(self, run: Run) -> None:
        for slot in run.running:
            slot.proc.kill()  # type: ignore[union-attr]
            await slot.proc.wait()  # type: ignore[union-attr]

    async def _exited(self, run: Run, slot: Slot, job: Obj) -> None:
        assert slot.proc is not None and slot.pod is not None
        code = slot.proc.returncode or 0
        message = ""
        if slot.term_file is not None and slot.term_file.exists():
            message = slot.term_file.read_text()
        if not message and code != 0 and slot.log_file is not None and slot.log_file.exists():
            message = slot.log_file.read_text()[-2048:]  # FallbackToLogsOnError
        pod_path = core_path(run.namespace, "pods", slot.pod)
        terminated = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "message": message,
            "startedAt": now_iso(),
            "finishedAt": now_iso(),
        }
        pod_conditions = [{"type": "PodScheduled", "status": "True"}]
        stopping = slot.stopping
        if stopping and not run.deadline_exceeded:
            pod_conditions.append(
                {"type": "DisruptionTarget", "status": "True", "reason": "JobSuspended"}
            )
        await self.api.patch(
            pod_path,
            {
                "status": {
                    "phase": "Succeeded" if code == 0 else "Failed",
                    "conditions": pod_conditions,
                    "containerStatuses": [
                        {
                            "name": job["spec"]["template"]["spec"]["containers"][0]["name"],
                            "ready": False,
                            "restartCount": 0,
                            "state": {"terminated": terminated},
                        }
                    ],
                }
            },
        )
        slot.proc = None
        slot.stopping = False
        backoff = int(job["spec"].get("backoffLimit", 6))
        action, rule = failure_policy_action(job, code)
        if run.deadline_exceeded:
            if not run.running:
                await self._fail_job(
                    run,
                    run.failed + 1,
                    "DeadlineExceeded",
                    "Job was active longer than specified deadline",
                )
        elif stopping:  # suspended: the Job controller deletes the pod; not a failure
            await self.api.delete(pod_path)
            slot.pod = None
        elif code == 0:
            slot.succeeded = True
            if all(run.slot(i).succeeded for i in range(completions(job))):
                run.done = True
                await self._job_status(
                    run,
                    {
                        "active": 0,
                        "succeeded": completions(job),
                        "completionTime": now_iso(),
                        "conditions": [self._cond("Complete", reason="CompletionsReached")],
                    },
                )
        elif action == "FailJob":
            await self._fail_job(
                run,
                run.failed + 1,
                "PodFailurePolicy",
                f"Container trainer for pod {run.namespace}/{slot.pod} failed "
                f"with exit code {code} matching FailJob rule at index {rule}",
            )
        elif action == "Ignore":  # a new pod, not counted against backoffLimit
            await self._job_status(run, {"active": len(run.running)})
        else:
            await self._pod_failed(run, backoff)

    def logs(self) -> str:
        """All trainer logs, for failure messages."""
        out = []
        for path in sorted(self.tmp.glob("*/log.txt")):
            out.append(f"--- {path.parent.name}\n{path.read_text()[-4000:]}")
        return "\n".join(out)


OPERATOR_ARGS = [
    "run",
    "--standalone",
    "--all-namespaces",
    "--verbose",
    "-m",
    "finetune_operator.main",
]


def operator_runner(*extra: str) -> KopfRunner:
    """The real operator (kopf run -m finetune_operator.main) in a thread; `extra` CLI flags."""
    return KopfRunner([*OPERATOR_ARGS[:-2], *extra, *OPERATOR_ARGS[-2:]], timeout=30)
