"""Fixtures: kmock's Kubernetes emulator, the local kubelet, and the real kopf operator."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Cluster, Kubelet, operator_runner
from kopf.testing import KopfRunner

FAKE_TRAINER = [sys.executable, str(Path(__file__).with_name("fake_trainer.py"))]


@pytest.fixture()
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    with Cluster(tmp_path) as c:
        monkeypatch.setenv("KUBECONFIG", str(c.kubeconfig))
        monkeypatch.setenv("FINETUNE_POLL_INTERVAL_SECONDS", "0.2")
        monkeypatch.setenv("FINETUNE_METRICS_PORT", "0")
        yield c


@pytest.fixture()
def kubelet(cluster: Cluster, tmp_path: Path) -> Iterator[Kubelet]:
    k = Kubelet(cluster, tmp_path / "kubelet", command=list(FAKE_TRAINER)).start()
    yield k
    k.stop()


@pytest.fixture()
def operator(cluster: Cluster) -> Iterator[KopfRunner]:
    with operator_runner() as runner:
        yield runner
