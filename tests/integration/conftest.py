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


# what the claims of the lifecycle tests' spec hold (the fake trainer checks its sources exist)
CLAIM_FILES = ("models/tiny-llama/config.json", "data/train.jsonl")


@pytest.fixture()
def kubelet(cluster: Cluster, tmp_path: Path) -> Iterator[Kubelet]:
    k = Kubelet(cluster, tmp_path / "kubelet", command=list(FAKE_TRAINER))
    for name in CLAIM_FILES:
        (k.pvc_root / name).parent.mkdir(parents=True, exist_ok=True)
        (k.pvc_root / name).write_text("{}\n")
    k.start()
    yield k
    k.stop()


@pytest.fixture()
def operator(cluster: Cluster) -> Iterator[KopfRunner]:
    with operator_runner() as runner:
        yield runner
