"""Blocking helpers for the end-to-end suite: a real cluster through kubernetes_asyncio.

Nothing here fakes the API: every call goes to the API server of the current kubeconfig
context. All calls run on one private event loop (the tests themselves are synchronous).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from finetune_operator.api import GROUP, PLURAL, VERSION
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

T = TypeVar("T")
Obj = dict[str, Any]

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = REPO_ROOT / "crds" / f"{GROUP}_{PLURAL}.yaml"
QUICKSTART_FILE = REPO_ROOT / "examples" / "quickstart.yaml"
FIELD_MANAGER = "finetune-e2e"
VERSION_TIMEOUT_SECONDS = 5.0
CALL_TIMEOUT_SECONDS = 30.0


class ClusterUnavailableError(Exception):
    """No cluster is configured, or its API server does not answer."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line (for skip reasons)."""
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text[:limit]}"


# --------------------------------------------------------------------------------------------
# kubeconfig checks (before any connection)
# --------------------------------------------------------------------------------------------
def kubeconfig_paths() -> list[Path]:
    """The kubeconfig files the clients read: $KUBECONFIG (path list) or ~/.kube/config."""
    env = os.environ.get("KUBECONFIG", "")
    if env.strip():
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p.strip()]
    return [Path("~/.kube/config").expanduser()]


def kubeconfig_problem() -> str | None:
    """Why no cluster is configured (None: at least one kubeconfig file exists)."""
    paths = kubeconfig_paths()
    if any(p.is_file() for p in paths):
        return None
    if os.environ.get("KUBECONFIG", "").strip():
        names = ", ".join(str(p) for p in paths)
        return f"no cluster configured: KUBECONFIG names no existing file ({names})"
    return "no cluster configured: KUBECONFIG is not set and ~/.kube/config does not exist"


# --------------------------------------------------------------------------------------------
# the cluster
# --------------------------------------------------------------------------------------------
class Cluster:
    """Synchronous wrappers over kubernetes_asyncio, returning plain dicts (camelCase keys)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, api: client.ApiClient, host: str) -> None:
        self.loop = loop
        self.api = api
        self.host = host
        self.version = "unknown"
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.ext = client.ApiextensionsV1Api(api)

    @classmethod
    def connect(cls, timeout: float = VERSION_TIMEOUT_SECONDS) -> Cluster:
        """Load the kubeconfig and check that the API server answers /version in `timeout` s."""
        loop = asyncio.new_event_loop()

        async def make() -> tuple[client.ApiClient, str]:
            cfg = client.Configuration()
            await config.load_kube_config(
                config_file=os.pathsep.join(str(p) for p in kubeconfig_paths()),
                client_configuration=cfg,
                persist_config=False,  # never rewrite the user's kubeconfig
            )
            return client.ApiClient(configuration=cfg), str(cfg.host)

        try:
            api, host = loop.run_until_complete(make())
        except Exception as exc:
            loop.close()
            raise ClusterUnavailableError(
                f"the kubeconfig could not be loaded: {one_line(exc)}"
            ) from exc
        cluster = cls(loop, api, host)
        try:
            cluster.version = cluster.call(cluster._server_version(), timeout=timeout)
        except Exception as exc:
            cluster.close()
            if isinstance(exc, ApiException):
                why = f"answered /version with HTTP {exc.status} {exc.reason}"
            elif isinstance(exc, TimeoutError):
                why = f"did not answer /version within {timeout:.0f} s"
            else:
                why = f"could not be reached: {one_line(exc)}"
            raise ClusterUnavailableError(f"the API server {host} {why}") from exc
        return cluster

    async def _server_version(self) -> str:
        """GET /version (raw: no client-side model validation of the answer)."""
        resp: Any = await client.VersionApi(self.api).get_code(_preload_content=False)
        try:
            info = await resp.json(content_type=None)
        finally:
            resp.release()
        return str((info or {}).get("gitVersion") or "unknown")

    def call(self, coro: Awaitable[T], timeout: float = CALL_TIMEOUT_SECONDS) -> T:
        """Run one API call to completion."""
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.run_until_complete(self.api.close())
        self.loop.close()

    def to_dict(self, obj: Any) -> Obj:
        """A typed client model as its wire dict."""
        data: Obj = self.api.sanitize_for_serialization(obj)
        return data

    def _or_none(self, coro: Awaitable[Any]) -> Obj | None:
        try:
            obj = self.call(coro)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return obj if isinstance(obj, dict) else self.to_dict(obj)

    # -- the CRD ---------------------------------------------------------------------------
    def install_crd(self, manifest: Obj) -> None:
        """Create the CRD, or update the one there with a (forced) server-side apply."""
        try:
            # the client takes plain dicts as bodies (its stubs say models)
            self.call(self.ext.create_custom_resource_definition(manifest))  # type: ignore[arg-type]
            return
        except ApiException as exc:
            if exc.status != 409:
                raise
        self.call(
            self.ext.patch_custom_resource_definition(  # type: ignore[call-arg]
                manifest["metadata"]["name"],
                manifest,
                field_manager=FIELD_MANAGER,
                force=True,
                _content_type="application/apply-patch+yaml",
            )
        )

    def crd(self, name: str) -> Obj | None:
        return self._or_none(self.ext.read_custom_resource_definition(name))

    # -- namespaces --------------------------------------------------------------------------
    def create_namespace(self, name: str, labels: dict[str, str]) -> Obj:
        body: Obj = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": labels},
        }
        return self.to_dict(self.call(self.core.create_namespace(body)))  # type: ignore[arg-type]

    def service_account(self, namespace: str, name: str) -> Obj | None:
        return self._or_none(self.core.read_namespaced_service_account(name, namespace))

    def delete_namespace(self, name: str) -> None:
        with contextlib.suppress(ApiException):
            self.call(self.core.delete_namespace(name, propagation_policy="Background"))

    def namespace(self, name: str) -> Obj | None:
        return self._or_none(self.core.read_namespace(name))

    # -- FineTuneJobs ------------------------------------------------------------------------
    def create_ftj(self, namespace: str, body: Obj) -> Obj:
        """Create a FineTuneJob as `kubectl apply` would: unknown fields are an error (400)."""
        obj: Any = self.call(
            self.custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, body, field_validation="Strict"
            )
        )
        if not isinstance(obj, dict):  # the client decodes only a 201 answer
            obj = self.ftj(namespace, body["metadata"]["name"])
        assert isinstance(obj, dict), f"FineTuneJob {body['metadata']['name']} was not created"
        return obj

    def ftj(self, namespace: str, name: str) -> Obj | None:
        return self._or_none(
            self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        )

    def ftjs(self, namespace: str) -> list[Obj]:
        listing: Obj = self.call(
            self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        )
        return list(listing.get("items") or [])

    def patch_ftj(self, namespace: str, name: str, patch: Obj) -> Obj:
        obj: Obj = self.call(
            self.custom.patch_namespaced_custom_object(  # type: ignore[call-arg]
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                patch,
                _content_type="application/merge-patch+json",
            )
        )
        return obj

    def delete_ftj(self, namespace: str, name: str) -> None:
        with contextlib.suppress(ApiException):
            self.call(
                self.custom.delete_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background"
                )
            )

    # -- children ----------------------------------------------------------------------------
    def job(self, namespace: str, name: str) -> Obj | None:
        return self._or_none(self.batch.read_namespaced_job(name, namespace))

    def configmap(self, namespace: str, name: str) -> Obj | None:
        return self._or_none(self.core.read_namespaced_config_map(name, namespace))

    def service(self, namespace: str, name: str) -> Obj | None:
        return self._or_none(self.core.read_namespaced_service(name, namespace))

    def pods(self, namespace: str, label_selector: str) -> list[Obj]:
        listing = self.call(self.core.list_namespaced_pod(namespace, label_selector=label_selector))
        return [self.to_dict(p) for p in listing.items or []]

    def events(self, namespace: str, name: str) -> list[Obj]:
        listing: Any = self.call(
            self.core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
        )
        return [self.to_dict(e) for e in listing.items or []]


def api_error_text(exc: ApiException) -> str:
    """An ApiException's response body as text."""
    body = exc.body
    if isinstance(body, bytes):
        return body.decode(errors="replace")
    return str(body or exc.reason or "")


def load_yaml(path: Path) -> Obj:
    """One YAML document as a dict."""
    data: Obj = yaml.safe_load(path.read_text())
    return data


def load_crd_manifest() -> Obj:
    return load_yaml(CRD_FILE)


def quickstart_body(namespace: str, name: str | None = None) -> Obj:
    """examples/quickstart.yaml in `namespace` (renamed when `name` is given)."""
    body = load_yaml(QUICKSTART_FILE)
    body["metadata"]["namespace"] = namespace
    if name is not None:
        body["metadata"]["name"] = name
    return body


def condition(obj: Obj | None, type_: str) -> Obj | None:
    """The status condition of that type, if any (never "the last condition")."""
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            found: Obj = cond
            return found
    return None


# --------------------------------------------------------------------------------------------
# waiting
# --------------------------------------------------------------------------------------------
def wait_for(
    check: Callable[[], T | None],
    what: str,
    timeout: float = 60.0,
    interval: float = 1.0,
    detail: Callable[[], object] | None = None,
) -> T:
    """Poll `check` until it returns something truthy; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = ""
            if detail is not None:
                try:
                    extra = f"\nlast seen: {detail()!r}"
                except Exception as exc:
                    extra = f"\n(could not describe the state: {exc})"
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}{extra}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------
# processes: the operator and the CLI
# --------------------------------------------------------------------------------------------
def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Operator:
    """The real operator (`python -m finetune_operator.main`) running as a subprocess."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    healthz: str

    def tail(self, lines: int = 80) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no operator log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.healthz, timeout=2) as resp:
                return int(resp.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None:
                pytest.fail(
                    f"the operator exited with code {self.proc.returncode} before "
                    f"{self.healthz} answered; log tail:\n{self.tail()}"
                )
            if time.monotonic() >= deadline:
                pytest.fail(
                    f"the operator's {self.healthz} did not answer 200 within {timeout:.0f} s; "
                    f"log tail:\n{self.tail()}"
                )
            time.sleep(0.5)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def start_operator(namespace: str, work: Path) -> Operator:
    """`python -m finetune_operator.main` watching only `namespace`, healthy on /healthz (its
    log in `work`); the caller stops it."""
    port = free_port()
    env = dict(os.environ)
    for key in ("FINETUNE_ALLOWED_NAMESPACES", "FINETUNE_MAX_GPUS_PER_JOB", "FINETUNE_VERBOSE"):
        env.pop(key, None)
    env.update(
        {
            "FINETUNE_WATCH_NAMESPACES": namespace,
            "FINETUNE_LIVENESS_ENDPOINT": f"http://127.0.0.1:{port}/healthz",
            "FINETUNE_METRICS_PORT": "0",
            "FINETUNE_POLL_INTERVAL_SECONDS": "1",
            "FINETUNE_ALLOW_TRUST_REMOTE_CODE": "false",
            "FINETUNE_LOG_FORMAT": "full",
            "PYTHONUNBUFFERED": "1",
        }
    )
    log_path = work / "operator.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "finetune_operator.main"],
            cwd=work,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    operator = Operator(proc=proc, log_path=log_path, healthz=env["FINETUNE_LIVENESS_ENDPOINT"])
    try:
        operator.wait_healthy(timeout=60)
    except BaseException:
        operator.stop()
        raise
    return operator


def run_cli(
    *args: str, timeout: float = 120.0, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`finetune ARGS...` (the console script of this environment), plain-text output."""
    script = Path(sys.executable).with_name("finetune")
    if not script.is_file():
        pytest.fail(f"no finetune console script next to {sys.executable}")
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    return subprocess.run(
        [str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
        check=False,
    )
