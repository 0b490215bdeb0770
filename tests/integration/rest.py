"""Path-based calls for the test harness, on kubernetes_asyncio's generic `call_api`.

The harness plays the API server's neighbours (Job controller, kubelet, GC) for many kinds, so
it addresses objects by URL path; the operator itself uses the typed calls in
`finetune_operator.kube`.
"""

from __future__ import annotations

from typing import Any

from finetune_operator.api import GROUP, PLURAL, VERSION
from finetune_operator.builders import JOB_LABEL
from finetune_operator.names import job_label
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

Obj = dict[str, Any]
JSON_RESPONSES = {code: "object" for code in (200, 201, 202)}


def custom_path(namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
    """URL path of FineTuneJobs (all namespaces when namespace is None)."""
    path = f"/apis/{GROUP}/{VERSION}"
    path += f"/namespaces/{namespace}/{PLURAL}" if namespace else f"/{PLURAL}"
    return path + "".join(f"/{part}" for part in (name, sub) if part)


def core_path(namespace: str, plural: str, name: str | None = None, sub: str | None = None) -> str:
    """URL path of a namespaced core/v1 resource."""
    path = f"/api/v1/namespaces/{namespace}/{plural}"
    return path + "".join(f"/{part}" for part in (name, sub) if part)


def jobs_path(namespace: str, name: str | None = None) -> str:
    """URL path of batch/v1 Jobs."""
    path = f"/apis/batch/v1/namespaces/{namespace}/jobs"
    return f"{path}/{name}" if name else path


class Rest:
    """get/create/patch/delete by path, returning plain dicts."""

    def __init__(self, server: str, user_agent: str) -> None:
        self.api = client.ApiClient(client.Configuration(host=server))
        self.api.user_agent = user_agent

    async def close(self) -> None:
        await self.api.close()

    async def _call(
        self, method: str, path: str, body: Any = None, query: list[tuple[str, str]] | None = None
    ) -> Obj:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = (
                "application/merge-patch+json" if method == "PATCH" else "application/json"
            )
        result = await self.api.call_api(
            path,
            method,
            query_params=query or [],
            header_params=headers,
            body=body,
            response_types_map=JSON_RESPONSES,
            _return_http_data_only=True,
        )
        return result if isinstance(result, dict) else {}

    async def get(self, path: str, params: dict[str, str] | None = None) -> Obj:
        return await self._call("GET", path, query=list((params or {}).items()))

    async def get_or_none(self, path: str) -> Obj | None:
        try:
            return await self.get(path)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, path: str, body: Obj) -> Obj:
        return await self._call("POST", path, body)

    async def patch(self, path: str, body: Obj) -> Obj:
        return await self._call("PATCH", path, body)

    async def delete(self, path: str) -> Obj | None:
        try:
            return await self._call("DELETE", path, {"propagationPolicy": "Background"})
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def job_pods(self, namespace: str, name: str) -> list[Obj]:
        """The trainer pods of FineTuneJob `name`."""
        label = job_label(name)
        listing = await self.get(
            core_path(namespace, "pods"), params={"labelSelector": f"{JOB_LABEL}={label}"}
        )
        return [
            p
            for p in listing.get("items") or []
            if (p.get("metadata", {}).get("labels") or {}).get(JOB_LABEL) == label
        ]
