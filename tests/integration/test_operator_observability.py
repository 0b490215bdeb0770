"""What an SRE sees: failure reasons on real pod states, metrics, liveness, API traffic."""

from __future__ import annotations

import json
import urllib.request

import pytest
from harness import free_port, operator_runner
from test_operator_lifecycle import condition, phase, spec


def condition_with_reason(cluster, name: str, reason: str) -> dict | None:
    for c in (cluster.ftj(name) or {}).get("status", {}).get("conditions") or []:
        if c.get("reason") == reason:
            return c
    return None


@pytest.mark.parametrize(
    ("fate", "reason", "words"),
    [
        ("unschedulable", "Unschedulable", ["no node fits", "Insufficient nvidia.com/gpu"]),
        ("image-pull", "ImagePullBackOff", ["cannot pull trainer image", "registry.invalid"]),
    ],
)
def test_stuck_pod_reason_is_in_status(cluster, kubelet, operator, fate, reason, words) -> None:
    kubelet.fates["stuck"] = fate
    cluster.apply_ftj("stuck", spec())
    cond = cluster.wait_for(
        lambda: condition_with_reason(cluster, "stuck", reason), what=f"a {reason} condition"
    )
    for word in words:
        assert word in cond["message"]
    assert phase(cluster, "stuck") == "Pending"


def test_oom_killed_fails_with_a_memory_hint(cluster, kubelet, operator) -> None:
    kubelet.fates["hungry"] = "oom"
    cluster.apply_ftj("hungry", spec(backoffLimit=0))
    cluster.wait_for(lambda: phase(cluster, "hungry") == "Failed", what="Failed")
    cond = condition(cluster, "hungry", "Failed")
    assert cond["reason"] == "OOMKilled"
    assert "memory" in cond["message"]


def test_operator_reads_nothing_while_a_job_runs(cluster, kubelet, operator) -> None:
    """Status comes from watch events and the pod's /progress: no GET/LIST per pass."""
    kubelet.env.update({"FAKE_STEPS": "40", "FAKE_STEP_SECONDS": "0.1"})
    cluster.apply_ftj("quiet", spec())
    cluster.wait_for(
        lambda: (
            ((cluster.ftj("quiet") or {}).get("status", {}).get("progress") or {}).get("step", 0)
            >= 5
        ),
        what="progress",
    )
    before = dict(cluster.emulator.counts)
    steps_before = cluster.ftj("quiet")["status"]["progress"]["step"]
    cluster.wait_for(
        lambda: cluster.ftj("quiet")["status"]["progress"]["step"] >= steps_before + 10,
        what="more progress",
    )
    after = dict(cluster.emulator.counts)
    made = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    assert made, "the operator patched the status while the job ran"
    assert set(made) <= {"UPDATE finetunejobs/status", "CREATE events"}, made


def test_creating_a_job_costs_one_event_and_no_reads(cluster, kubelet, operator) -> None:
    """ConfigMap, Job, status patches and one JobCreated event (the first phase needs no
    event of its own), plus kopf's finalizer/annotation patches; no GET or LIST."""
    kubelet.fates["warm"] = kubelet.fates["parked"] = "unschedulable"
    cluster.apply_ftj("warm", spec())  # the operator's start-up discovery and watches go first
    cluster.wait_for(lambda: phase(cluster, "warm") == "Pending", what="warm-up Pending")
    before = dict(cluster.emulator.counts)
    cluster.apply_ftj("parked", spec())
    cluster.wait_for(lambda: phase(cluster, "parked") == "Pending", what="Pending")
    cluster.wait_for(
        lambda: condition_with_reason(cluster, "parked", "Unschedulable"), what="Unschedulable"
    )
    made = {
        k: v - before.get(k, 0) for k, v in cluster.emulator.counts.items() if v != before.get(k, 0)
    }
    assert made["CREATE configmaps"] == 1 and made["CREATE jobs"] == 1, made
    assert made["CREATE events"] == 1, made
    assert not [k for k in made if k.startswith(("GET", "LIST"))], made
    assert [e["reason"] for e in cluster.events("parked")] == ["JobCreated"]


def test_metrics_and_liveness_endpoints(cluster, kubelet, monkeypatch) -> None:
    metrics_port, health_port = free_port(), free_port()
    monkeypatch.setenv("FINETUNE_METRICS_PORT", str(metrics_port))
    kubelet.env.update({"FAKE_STEPS": "6", "FAKE_STEP_SECONDS": "0.1"})
    with operator_runner(f"--liveness=http://127.0.0.1:{health_port}/healthz"):
        cluster.apply_ftj("watched", spec())
        cluster.wait_for(lambda: phase(cluster, "watched") == "Succeeded", what="Succeeded")
        cluster.apply_ftj("rejected", spec(method={"type": "lora", "r": 0}))
        cluster.wait_for(lambda: phase(cluster, "rejected") == "Failed", what="Failed")

        def scrape() -> str:
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.read().decode()

        def scraped_with_job() -> str | None:
            text = scrape()
            return text if 'finetune_job_step{name="watched"' in text else None

        text = cluster.wait_for(scraped_with_job, what="per-job gauges in /metrics")
        assert 'finetune_jobs{phase="Succeeded"}' in text
        assert 'finetune_jobs{phase="Failed"}' in text
        assert "finetune_job_create_latency_seconds_count" in text
        assert "finetune_invalid_specs_total" in text
        line = next(
            x for x in text.splitlines() if x.startswith('finetune_job_step{name="watched"')
        )
        assert float(line.split()[-1]) == 6.0

        url = f"http://127.0.0.1:{health_port}/healthz"
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.status == 200
            json.loads(resp.read())  # kopf's probe results, as JSON
