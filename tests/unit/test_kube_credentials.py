"""Credentials: one kubeconfig reader (kubernetes_asyncio) for our calls and for kopf's."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from pathlib import Path

import pytest
import yaml
from finetune_operator.kube import connection_info, default_namespace, load_configuration

CA_PEM = b"-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"


def write_kubeconfig(path: Path, user: dict, namespace: str = "team-a") -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "ctx",
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {
                            "server": "https://api.example:6443",
                            "certificate-authority-data": base64.b64encode(CA_PEM).decode(),
                        },
                    }
                ],
                "users": [{"name": "u", "user": user}],
                "contexts": [
                    {
                        "name": "ctx",
                        "context": {"cluster": "c", "user": "u", "namespace": namespace},
                    }
                ],
            }
        )
    )
    return path


@pytest.fixture(autouse=True)
def outside_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def test_token_kubeconfig_becomes_kopf_connection_info(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kc", {"token": "s3cret"})))
    info = connection_info(asyncio.run(load_configuration()))
    assert info.server == "https://api.example:6443"
    assert (info.scheme, info.token) == ("Bearer", "s3cret")
    assert info.ca_path and Path(info.ca_path).read_bytes() == CA_PEM
    assert info.insecure is False
    assert info.default_namespace == "team-a"


def test_exec_plugin_token_is_used(tmp_path, monkeypatch) -> None:
    """EKS/GKE/AKS-style kubeconfigs get their token from a command, as with kubectl."""
    credential = {
        "apiVersion": "client.authentication.k8s.io/v1beta1",
        "kind": "ExecCredential",
        "status": {"token": "from-exec"},
    }
    user = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1beta1",
            "command": sys.executable,
            "args": ["-c", f"print({json.dumps(json.dumps(credential))})"],
        }
    }
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kc", user)))
    info = connection_info(asyncio.run(load_configuration()))
    assert (info.scheme, info.token) == ("Bearer", "from-exec")


def _counting_exec_plugin(tmp_path: Path, expires: str) -> dict:
    """An exec plugin that returns token-<n> on its n-th run, valid until `expires`."""
    script = tmp_path / "plugin.py"
    script.write_text(
        "import json, pathlib\n"
        f"runs = pathlib.Path({str(tmp_path / 'runs')!r})\n"
        "n = int(runs.read_text()) + 1 if runs.exists() else 1\n"
        "runs.write_text(str(n))\n"
        "print(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1beta1',\n"
        "    'kind': 'ExecCredential',\n"
        f"    'status': {{'token': f'token-{{n}}', 'expirationTimestamp': {expires!r}}}}}))\n"
    )
    return {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1beta1",
            "command": sys.executable,
            "args": [str(script)],
        }
    }


@pytest.mark.parametrize(
    ("expires", "token_at_next_request", "runs"),
    [
        ("2000-01-01T00:00:00Z", "Bearer token-2", "2"),
        ("2999-01-01T00:00:00Z", "Bearer token-1", "1"),
    ],
    ids=["expired", "still-valid"],
)
def test_expiring_exec_token_is_refreshed_before_a_request(
    tmp_path, monkeypatch, expires: str, token_at_next_request: str, runs: str
) -> None:
    """An operator run from a laptop or CI keeps working past its cloud token's lifetime: the
    plugin is re-run once the token has expired, and not before."""
    user = _counting_exec_plugin(tmp_path, expires)
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kc", user)))

    async def token_sent_with_a_request() -> str:
        configuration = await load_configuration()
        assert configuration.api_key["BearerToken"] == "Bearer token-1"
        return await configuration.get_api_key_with_prefix("BearerToken")

    sent = asyncio.run(token_sent_with_a_request())
    assert sent == token_at_next_request
    assert (tmp_path / "runs").read_text() == runs


def test_kubeconfig_path_list_is_merged(tmp_path, monkeypatch) -> None:
    first = write_kubeconfig(tmp_path / "a", {"token": "t"}, namespace="from-a")
    second = tmp_path / "b"
    second.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "clusters": []}))
    monkeypatch.setenv("KUBECONFIG", f"{first}:{second}")
    assert default_namespace() == "from-a"
    assert asyncio.run(load_configuration()).host == "https://api.example:6443"


def test_no_kubeconfig_defaults_to_default_namespace(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    assert default_namespace() == "default"
