"""A small async Kubernetes REST client (aiohttp) on kopf's credentials.

The operator and the `finetune` cluster commands use it for the few calls they make on their
own (children, status, pods, the trainer's /progress); kopf keeps its own client for watching.
Credentials come from kopf's login functions, so the same kubeconfig / service account works.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import kopf
from finetune_trainer.progress import PROGRESS_PATH, Progress
from pydantic import ValidationError

from finetune_operator.api import GROUP, PLURAL, VERSION
from finetune_operator.builders import CONTAINER_NAME, JOB_LABEL, PROGRESS_PORT_NAME

Obj = dict[str, Any]
log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30)
PROGRESS_TIMEOUT = aiohttp.ClientTimeout(total=3)


class ApiError(Exception):
    """A failed API call, with the HTTP status and the server's Status reason/message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def login(settings: Any = None) -> Any:
    """Credentials: the pod's service account, else the kubeconfig (KUBECONFIG or ~/.kube)."""
    settings = settings or kopf.OperatorSettings()
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(
        settings=settings
    )
    if info is None:
        raise kopf.LoginError("no Kubernetes credentials: no service account and no kubeconfig")
    return info


def custom_path(namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
    """URL path of FineTuneJobs (all namespaces when namespace is None)."""
    path = f"/apis/{GROUP}/{VERSION}"
    path += f"/namespaces/{namespace}/{PLURAL}" if namespace else f"/{PLURAL}"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


def core_path(namespace: str, plural: str, name: str | None = None, sub: str | None = None) -> str:
    """URL path of a namespaced core/v1 resource."""
    path = f"/api/v1/namespaces/{namespace}/{plural}"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


def jobs_path(namespace: str, name: str | None = None) -> str:
    """URL path of batch/v1 Jobs."""
    path = f"/apis/batch/v1/namespaces/{namespace}/jobs"
    return f"{path}/{name}" if name else path


def path_for(manifest: Obj, name: str | None = None) -> str:
    """The collection (or, with name, the object) path of a manifest's kind."""
    namespace = manifest["metadata"]["namespace"]
    match manifest["kind"]:
        case "ConfigMap":
            return core_path(namespace, "configmaps", name)
        case "Job":
            return jobs_path(namespace, name)
        case kind:
            raise ValueError(f"unsupported kind {kind}")


class Kube:
    """Async REST calls against the API server described by kopf's ConnectionInfo."""

    def __init__(self, info: Any) -> None:
        self.info = info
        self.server = str(info.server).rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.info.as_ssl_context()),
                headers=self.info.as_http_headers(),
                timeout=REQUEST_TIMEOUT,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Obj:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if body is not None else {}
        async with self.session.request(
            method, self.server + path, data=data, params=params, headers=headers
        ) as resp:
            text = await resp.text()
            if resp.status >= 400:
                try:
                    err = json.loads(text)
                    raise ApiError(resp.status, str(err.get("reason")), str(err.get("message")))
                except (ValueError, AttributeError):
                    raise ApiError(resp.status, resp.reason or "", text[:500]) from None
            try:
                result = json.loads(text) if text else {}
            except ValueError:
                return {"text": text}
            return result if isinstance(result, dict) else {"items": result}

    async def get(self, path: str, params: dict[str, str] | None = None) -> Obj:
        return await self.request("GET", path, params=params)

    async def get_or_none(self, path: str) -> Obj | None:
        try:
            return await self.get(path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, path: str, body: Obj) -> Obj:
        return await self.request("POST", path, body)

    async def patch(self, path: str, body: Obj) -> Obj:
        return await self.request("PATCH", path, body, content_type=MERGE_PATCH)

    async def delete(self, path: str) -> Obj | None:
        try:
            return await self.request("DELETE", path, {"propagationPolicy": "Background"})
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def text(self, path: str, params: dict[str, str] | None = None) -> str:
        async with self.session.get(self.server + path, params=params) as resp:
            body = await resp.text()
            if resp.status >= 400:
                raise ApiError(resp.status, resp.reason or "", body[:500])
            return body

    async def stream_lines(self, path: str, params: dict[str, str]) -> AsyncIterator[str]:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with self.session.get(self.server + path, params=params, timeout=timeout) as resp:
            if resp.status >= 400:
                raise ApiError(resp.status, resp.reason or "", (await resp.text())[:500])
            async for line in resp.content:
                yield line.decode(errors="replace").rstrip("\n")

    # ---- FineTuneJob-specific helpers ----------------------------------------------------
    async def job_pods(self, namespace: str, name: str) -> list[Obj]:
        """The trainer pods of FineTuneJob `name` (label-filtered here too, to be safe)."""
        listing = await self.get(
            core_path(namespace, "pods"), params={"labelSelector": f"{JOB_LABEL}={name}"}
        )
        return [
            p
            for p in listing.get("items") or []
            if (p.get("metadata", {}).get("labels") or {}).get(JOB_LABEL) == name
        ]


def progress_url(pod: Obj) -> str | None:
    """http://<podIP>:<progress port>/progress of a running trainer pod, if it has one."""
    status = pod.get("status") or {}
    ip = status.get("podIP")
    if not ip or status.get("phase") != "Running":
        return None
    for container in pod.get("spec", {}).get("containers") or []:
        if container.get("name") != CONTAINER_NAME:
            continue
        for port in container.get("ports") or []:
            if port.get("name") == PROGRESS_PORT_NAME:
                host = f"[{ip}]" if ":" in ip else ip
                return f"http://{host}:{port['containerPort']}{PROGRESS_PATH}"
    return None


async def fetch_progress(session: aiohttp.ClientSession, pod: Obj) -> Progress | None:
    """GET the trainer's /progress; None when unreachable or not a Progress document."""
    url = progress_url(pod)
    if url is None:
        return None
    try:
        async with session.get(url, timeout=PROGRESS_TIMEOUT) as resp:
            if resp.status != 200:
                return None
            return Progress.model_validate_json(await resp.read())
    except (TimeoutError, aiohttp.ClientError, ValidationError, OSError) as exc:
        log.debug("progress of %s unavailable: %s", url, exc)
        return None
