"""The few Kubernetes API calls the operator and the `finetune` cluster commands make themselves.

A thin layer over `kubernetes_asyncio`'s typed APIs (kopf keeps its own client for watching).
Credentials are loaded once, by kubernetes_asyncio (the pod's service account, else KUBECONFIG
or ~/.kube/config, exec plugins included), and handed to kopf too (`connection_info`). Calls
return plain camelCase dicts, so builders and `derive_status` never see
client model classes. Errors are `kubernetes_asyncio`'s `ApiException` (`.status`, `.reason`).
The trainer's /progress is fetched with a separate plain HTTP session that carries no API
credentials.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from enum import StrEnum
from typing import Any, cast

import aiohttp
import kopf
from finetune_trainer.progress import PROGRESS_PATH, Progress
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException
from pydantic import ValidationError

from finetune_operator.api import GROUP, PLURAL, VERSION
from finetune_operator.builders import CONTAINER_NAME, JOB_LABEL, PROGRESS_PORT_NAME
from finetune_operator.names import job_label

Obj = dict[str, Any]
log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
PROGRESS_TIMEOUT = aiohttp.ClientTimeout(total=3)
REQUEST_TIMEOUT_SECONDS = 30

__all__ = [
    "ApiErrorKind",
    "ApiException",
    "Kube",
    "api_error_kind",
    "api_message",
    "connect",
    "connection_info",
    "default_namespace",
    "fetch_progress",
    "in_cluster",
    "load_configuration",
    "progress_url",
]


def api_message(exc: ApiException) -> str:
    """The API server's Status message of a failed call (its reason when there is none)."""
    try:
        body = json.loads(exc.body or "")
    except (TypeError, ValueError):
        body = None
    if isinstance(body, dict) and body.get("message"):
        return f"{exc.status} {body.get('reason') or exc.reason}: {body['message']}"
    return f"{exc.status} {exc.reason}"


class ApiErrorKind(StrEnum):
    """What an API error means for the request that got it."""

    TRANSIENT = "transient"  # 5xx, 429, 408, 409, 401: retry with backoff
    FORBIDDEN = "forbidden"  # 403 (RBAC, ResourceQuota, a terminating namespace): may clear up
    REJECTED = "rejected"  # 400, 404, 422, ...: the request itself is refused; retrying cannot help


# 4xx that go away by themselves: timeout, conflict (retry against the new state), rate limit,
# and 401 (kopf and kubernetes_asyncio fetch fresh credentials)
_RETRYABLE_4XX = frozenset({401, 408, 409, 429})


def api_error_kind(status: int | None) -> ApiErrorKind:
    """Classify an API status code (None: no answer at all, e.g. a dropped connection)."""
    if status == 403:
        return ApiErrorKind.FORBIDDEN
    if status is not None and 400 <= status < 500 and status not in _RETRYABLE_4XX:
        return ApiErrorKind.REJECTED
    return ApiErrorKind.TRANSIENT


def in_cluster() -> bool:
    """Running in a pod (the API server's service environment is set)."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def kubeconfig_path() -> str:
    """KUBECONFIG (a path list, as kubectl reads it), else ~/.kube/config."""
    return os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")


async def load_configuration() -> client.Configuration:
    """Client settings from the pod's service account, else from the kubeconfig (with its
    exec / auth-provider plugins, as kubectl)."""
    configuration = client.Configuration()
    if in_cluster():
        # refreshes the projected service-account token as it rotates
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        loader = await config.load_kube_config(
            config_file=kubeconfig_path(),
            client_configuration=configuration,
            persist_config=False,
        )
        if hasattr(loader, "exec_plugin_expiry"):
            configuration.refresh_api_key_hook = _exec_token_refresher(loader)
    return configuration


def _exec_token_refresher(loader: Any) -> Callable[[client.Configuration], Awaitable[None]]:
    """A hook run before each request: re-runs the kubeconfig's exec plugin once the token it
    gave has expired (kubernetes_asyncio skips the command while the token is still valid)."""

    async def refresh(configuration: client.Configuration) -> None:
        if await loader.load_from_exec_plugin():
            configuration.api_key["BearerToken"] = loader.token

    return refresh


def connection_info(configuration: client.Configuration) -> kopf.ConnectionInfo:
    """The same credentials as kopf's ConnectionInfo, so kopf's watches and our calls agree."""
    scheme, token = None, None
    if authorization := configuration.api_key.get("BearerToken"):
        scheme, _, token = str(authorization).partition(" ")
    return kopf.ConnectionInfo(
        server=str(configuration.host),
        ca_path=configuration.ssl_ca_cert or None,
        insecure=not configuration.verify_ssl,
        scheme=scheme or None,
        token=token or None,
        certificate_path=configuration.cert_file or None,
        private_key_path=configuration.key_file or None,
        default_namespace=default_namespace(),
    )


async def connect() -> Kube:
    """A Kube on the pod's service account in a cluster, else on KUBECONFIG / ~/.kube/config."""
    return Kube(client.ApiClient(await load_configuration()))


def default_namespace() -> str:
    """The namespace of the service account, else of the kubeconfig's current context."""
    sa_namespace = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    if in_cluster() and os.path.exists(sa_namespace):
        with open(sa_namespace) as fh:
            return fh.read().strip() or "default"
    try:
        _, current = config.list_kube_config_contexts(config_file=kubeconfig_path())
    except (config.ConfigException, OSError):
        return "default"
    return str((current or {}).get("context", {}).get("namespace") or "default")


class Kube:
    """Typed API groups over one `ApiClient`; every result is a plain dict."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)

    async def close(self) -> None:
        await self.api.close()

    @staticmethod
    async def _json(call: Awaitable[Any]) -> Obj:
        """The JSON body of a typed call made with `_preload_content=False`: the object as the
        API server sent it, without a round trip through the client's model classes."""
        resp = cast(aiohttp.ClientResponse, await call)
        data = await resp.read()
        if not 200 <= resp.status <= 299:
            error = ApiException(status=resp.status, reason=resp.reason)
            error.body, error.headers = data, resp.headers
            raise error
        return dict(json.loads(data))

    @staticmethod
    async def _unless_missing(call: Awaitable[Any]) -> Any | None:
        """The call's result, or None when the API server answers 404 Not Found."""
        try:
            return await call
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    # ---- FineTuneJobs ----------------------------------------------------------------------
    async def get_finetunejob(self, namespace: str, name: str) -> Obj | None:
        found = await self._unless_missing(
            self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _request_timeout=REQUEST_TIMEOUT_SECONDS
            )
        )
        return None if found is None else dict(found)

    async def list_finetunejobs(self, namespace: str | None) -> list[Obj]:
        """FineTuneJobs of a namespace, or of all namespaces when namespace is None."""
        if namespace is None:
            listing = await self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
        else:
            listing = await self.custom.list_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL
            )
        return list(listing.get("items") or [])

    async def patch_finetunejob_status(self, namespace: str, name: str, status: Obj) -> Obj:
        """Merge-patch the status subresource; returns the updated object."""
        return dict(
            await self.custom.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                {"status": status},
                # accepted at run time, missing from the stub; the default would be JSON Patch
                _content_type=MERGE_PATCH,  # type: ignore[call-arg]
                _request_timeout=REQUEST_TIMEOUT_SECONDS,
            )
        )

    async def delete_finetunejob(self, namespace: str, name: str) -> bool:
        """Delete (children go by garbage collection); False when it did not exist."""
        deleted = await self._unless_missing(
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background"
            )
        )
        return deleted is not None

    # ---- children ---------------------------------------------------------------------------
    async def create_child(self, manifest: Obj) -> Obj:
        """Create a ConfigMap, a Service or a Job from its manifest."""
        namespace = manifest["metadata"]["namespace"]
        body: Any = manifest  # the client serialises plain dicts as they are
        options: Any = {"_preload_content": False, "_request_timeout": REQUEST_TIMEOUT_SECONDS}
        match manifest["kind"]:
            case "ConfigMap":
                return await self._json(
                    self.core.create_namespaced_config_map(namespace, body, **options)
                )
            case "Service":
                return await self._json(
                    self.core.create_namespaced_service(namespace, body, **options)
                )
            case "Job":
                return await self._json(
                    self.batch.create_namespaced_job(namespace, body, **options)
                )
            case kind:
                raise ValueError(f"unsupported kind {kind}")

    async def read_child(self, kind: str, namespace: str, name: str) -> Obj | None:
        """A ConfigMap, Service or Job by name; None when it does not exist."""
        call: Awaitable[Any]
        match kind:
            case "ConfigMap":
                call = self.core.read_namespaced_config_map(name, namespace, _preload_content=False)
            case "Service":
                call = self.core.read_namespaced_service(name, namespace, _preload_content=False)
            case "Job":
                call = self.batch.read_namespaced_job(name, namespace, _preload_content=False)
            case _:
                raise ValueError(f"unsupported kind {kind}")
        found: Obj | None = await self._unless_missing(self._json(call))
        return found

    async def patch_job(self, namespace: str, name: str, patch: Obj) -> Obj:
        """Merge-patch a Job (e.g. spec.suspend)."""
        return await self._json(
            self.batch.patch_namespaced_job(
                name,
                namespace,
                patch,
                _preload_content=False,
                _content_type=MERGE_PATCH,  # type: ignore[call-arg]  # see patch_finetunejob_status
            )
        )

    # ---- pods -------------------------------------------------------------------------------
    async def job_pods(self, namespace: str, name: str) -> list[Obj]:
        """The trainer pods of FineTuneJob `name`."""
        label = job_label(name)
        listing = await self._json(
            self.core.list_namespaced_pod(
                namespace, label_selector=f"{JOB_LABEL}={label}", _preload_content=False
            )
        )
        pods: list[Obj] = listing.get("items") or []
        return [
            p for p in pods if (p.get("metadata", {}).get("labels") or {}).get(JOB_LABEL) == label
        ]

    async def pod_log(self, namespace: str, pod: str, container: str) -> str:
        return str(await self.core.read_namespaced_pod_log(pod, namespace, container=container))

    async def follow_pod_log(self, namespace: str, pod: str, container: str) -> AsyncIterator[str]:
        """Stream a pod's log lines as they are written."""
        resp = cast(
            aiohttp.ClientResponse,
            await self.core.read_namespaced_pod_log(
                pod, namespace, container=container, follow=True, _preload_content=False
            ),
        )
        try:
            if resp.status >= 400:
                raise ApiException(status=resp.status, reason=resp.reason)
            async for line in resp.content:
                yield line.decode(errors="replace").rstrip("\n")
        finally:
            resp.release()


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
