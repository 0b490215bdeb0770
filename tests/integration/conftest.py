"""Fixtures: kmock's Kubernetes emulator, the local kubelet, and the real kopf operator."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from harness import Cluster, Kubelet
from kopf.testing import KopfRunner

FAKE_TRAINER = [sys.executable, str(Path(__file__).with_name("fake_trainer.py"))]
OPERATOR_ARGS = [
    "run",
    "--standalone",
    "--all-namespaces",
    "--verbose",
    "-m",
    "finetune_operator.main",
]


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


@contextmanager
def running_operator() -> Iterator[KopfRunner]:
    with KopfRunner(OPERATOR_ARGS, timeout=30) as runner:
        yield runner


@pytest.fixture()
def operator(cluster: Cluster) -> Iterator[Callable[[], KopfRunner]]:
    with running_operator() as runner:
        yield lambda: runner
