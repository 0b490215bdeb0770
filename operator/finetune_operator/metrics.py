"""Prometheus metrics of the operator (prometheus_client, served on :9090/metrics)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from finetune_operator.api import FineTuneJobStatus

log = logging.getLogger(__name__)

PHASES = ("Pending", "ValidatingData", "Running", "Succeeded", "Failed", "Suspended")

JOBS = Gauge("finetune_jobs", "FineTuneJobs known to the operator, by phase.", ["phase"])
RECONCILE_ERRORS = Counter(
    "finetune_reconcile_errors_total", "Errors while reconciling FineTuneJobs.", ["kind"]
)
INVALID_SPECS = Counter("finetune_invalid_specs_total", "FineTuneJobs rejected as invalid.")
JOB_CREATE_LATENCY = Histogram(
    "finetune_job_create_latency_seconds",
    "Time from FineTuneJob creation to its batch/v1 Job being created.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
)
PROGRESS = Gauge(
    "finetune_job_progress_percent", "Training progress of a FineTuneJob.", ["namespace", "name"]
)
STEP = Gauge("finetune_job_step", "Optimizer step of a FineTuneJob.", ["namespace", "name"])
LOSS = Gauge("finetune_job_loss", "Latest training loss of a FineTuneJob.", ["namespace", "name"])
EVAL_LOSS = Gauge(
    "finetune_job_eval_loss", "Latest evaluation loss of a FineTuneJob.", ["namespace", "name"]
)
TOKENS_PER_SECOND = Gauge(
    "finetune_job_tokens_per_second", "Training throughput of a FineTuneJob.", ["namespace", "name"]
)

_phases: dict[tuple[str, str], str] = {}
_lock = threading.Lock()
_started = False


def start(port: int | None = None) -> None:
    """Serve /metrics once per process (FINETUNE_METRICS_PORT, default 9090; 0 disables)."""
    global _started
    port = int(os.environ.get("FINETUNE_METRICS_PORT", "9090")) if port is None else port
    with _lock:
        if _started or port == 0:
            return
        start_http_server(port)
        _started = True
    log.info("serving Prometheus metrics on :%d/metrics", port)


def _refresh_phases() -> None:
    counts = dict.fromkeys(PHASES, 0)
    for phase in _phases.values():
        counts[phase] = counts.get(phase, 0) + 1
    for phase, count in counts.items():
        JOBS.labels(phase=phase).set(count)


def observe(namespace: str, name: str, status: FineTuneJobStatus) -> None:
    """Record a FineTuneJob's phase and progress gauges."""
    with _lock:
        if status.phase:
            _phases[(namespace, name)] = status.phase
        _refresh_phases()
    progress = status.progress
    if progress is None:
        return
    for gauge, value in (
        (PROGRESS, progress.percent),
        (STEP, progress.step),
        (LOSS, progress.loss),
        (EVAL_LOSS, progress.eval_loss),
        (TOKENS_PER_SECOND, progress.tokens_per_second),
    ):
        if value is not None:
            gauge.labels(namespace=namespace, name=name).set(value)


def forget(namespace: str, name: str) -> None:
    """Drop a deleted FineTuneJob's series."""
    with _lock:
        _phases.pop((namespace, name), None)
        _refresh_phases()
    for gauge in (PROGRESS, STEP, LOSS, EVAL_LOSS, TOKENS_PER_SECOND):
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, name)
