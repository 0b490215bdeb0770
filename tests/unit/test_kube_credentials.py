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
