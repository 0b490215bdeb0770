"""derive_status over a table of observed states; conditions; events; merge patches."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from finetune_operator.api import FineTuneJobStatus, parse_spec
from finetune_operator.reasons import Reason
from finetune_operator.status import (
    PhaseEvent,
    blocked_status,
    derive_status,
    failed_status,
    format_eta,
    get_condition,
    latest_summary,
    merge_checkpoints,
    merge_patch,
    phase_event,
    running_pod,
    set_condition,
    status_dict,
    status_patch,
    tracking_event,
    workers_status,
)
from finetune_trainer.progress import (
    CheckpointInfo,
    Estimate,
    Outcome,
    Phase,
    Progress,
    Summary,
    TrackerInfo,
)

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)
SPEC = parse_spec(
    {
        "model": {"source": "hf://Qwen/Qwen2.5-0.5B"},
        "dataset": {"source": "s3://b/train.jsonl"},
        "output": {"uri": "s3://b/out"},
        "resources": {"gpus": 1, "memory": "16Gi"},
        "activeDeadlineSeconds": 3600,
        "backoffLimit": 2,
    }
)


def job(*conditions: tuple[str, str], suspend: bool = False, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "ft"},
        "spec": {"suspend": suspend},
        "status": {
            "startTime": "2026-01-01T12:00:00Z",
            **status,
            "conditions": [
                {
                    "type": t,
                    "status": "True",
                    "reason": r,
                    "message": f"{t} {r}",
                    "lastTransitionTime": "2026-01-01T12:04:00Z",
                }
                for t, r in conditions
            ],
        },
    }


def pod(
    name: str = "ft-a",
    phase: str = "Running",
    *,
    waiting: str | None = None,
    terminated: dict[str, Any] | None = None,
    conditions: list[dict[str, Any]] | None = None,
    created: str = "2026-01-01T12:00:00Z",
) -> dict[str, Any]:
    state: dict[str, Any] = {"running": {}}
    if waiting:
        state = {"waiting": {"reason": waiting, "message": f"{waiting} detail"}}
    if terminated is not None:
        state = {"terminated": terminated}
    return {
        "metadata": {"name": name, "creationTimestamp": created},
        "spec": {"containers": [{"name": "trainer", "image": "reg/trainer:1"}]},
        "status": {
            "phase": phase,
            "podIP": "10.0.0.5",
            "conditions": conditions or [],
            "containerStatuses": [{"name": "trainer", "state": state}],
        },
    }


def unschedulable() -> dict[str, Any]:
    return pod(
        phase="Pending",
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
            }
        ],
    )


def summary(outcome: Outcome, **kw: Any) -> Summary:
    return Summary(outcome=outcome, **kw)


PROGRESS = Progress(
    phase=Phase.TRAINING, step=50, total_steps=200, loss=1.25, eta_seconds=3900, updated_at=T1
)
OK = summary(
    Outcome.SUCCEEDED,
    adapter_uri="s3://b/out/adapter",
    output_uri="s3://b/out",
    metrics={"evalLoss": 0.9, "perplexity": 2.46},
    trainable_params=1000,
    trained_tokens=50000,
)
BAD_DATA = summary(
    Outcome.INVALID_INPUT,
    reason="InvalidDataset",
    message="dataset.source: line 3: invalid JSON; line 9: missing 'output'",
)
PREEMPTED = summary(
    Outcome.PREEMPTED,
    last_checkpoint=CheckpointInfo(step=40, uri="s3://b/out/checkpoints/checkpoint-40", time=T0),
)


def term(code: int, reason: str = "Error", message: str = "") -> dict[str, Any]:
    return {"exitCode": code, "reason": reason, "message": message}


# (id, job, pods, progress, summary, phase, {condition type: (status, reason)}, message part)
CASES = [
    ("no-job-yet", None, [], None, None, "Pending", {}, None),
    (
        "pod-starting",
        job(active=1),
        [pod(phase="Pending")],
        None,
        None,
        "Pending",
        {"Created": ("True", "JobCreated"), "Running": ("False", "PodStarting")},
        None,
    ),
    (
        "unschedulable",
        job(active=1),
        [unschedulable()],
        None,
        None,
        "Pending",
        {"Running": ("False", "Unschedulable")},
        "Insufficient nvidia.com/gpu",
    ),
    (
        "image-pull",
        job(active=1),
        [pod(phase="Pending", waiting="ImagePullBackOff")],
        None,
        None,
        "Pending",
        {"Running": ("False", "ImagePullBackOff")},
        "reg/trainer:1",
    ),
    (
        "validating",
        job(active=1),
        [pod()],
        Progress(phase=Phase.VALIDATING_DATA),
        None,
        "ValidatingData",
        {"Running": ("True", "ValidatingData")},
        None,
    ),
    (
        "training",
        job(active=1),
        [pod()],
        PROGRESS,
        None,
        "Running",
        {"Running": ("True", "Training")},
        "training",
    ),
    (
        "succeeded",
        job(("Complete", "CompletionsReached"), succeeded=1, completionTime="2026-01-01T12:04:00Z"),
        [pod(phase="Succeeded", terminated=term(0, "Completed", OK.to_termination_message()))],
        None,
        OK,
        "Succeeded",
        {"Succeeded": ("True", "Completed"), "Running": ("False", "Completed")},
        "s3://b/out/adapter",
    ),
    (
        "invalid-dataset",
        job(("Failed", "PodFailurePolicy"), failed=1),
        [pod(phase="Failed", terminated=term(65, message=BAD_DATA.to_termination_message()))],
        None,
        BAD_DATA,
        "Failed",
        {"Failed": ("True", "InvalidInput")},
        "line 3",
    ),
    (
        "oom-killed",
        job(("Failed", "BackoffLimitExceeded"), failed=3),
        [pod(phase="Failed", terminated=term(137, "OOMKilled"))],
        None,
        None,
        "Failed",
        {"Failed": ("True", "OOMKilled")},
        "spec.resources.memory=16Gi",
    ),
    (
        "oom-retrying",
        job(active=1, failed=1),
        [
            pod("ft-a", "Failed", terminated=term(137, "OOMKilled")),
            pod("ft-b", "Pending", created="2026-01-01T12:01:00Z"),
        ],
        None,
        None,
        "Pending",
        {"Running": ("False", "OOMKilled")},
        "retrying",
    ),
    (
        "deadline",
        job(("Failed", "DeadlineExceeded"), failed=1),
        [pod(phase="Failed", terminated=term(143))],
        None,
        None,
        "Failed",
        {"Failed": ("True", "DeadlineExceeded")},
        "3600s",
    ),
    (
        "backoff",
        job(("Failed", "BackoffLimitExceeded"), failed=3),
        [
            pod(
                phase="Failed",
                terminated=term(
                    1,
                    message=summary(
                        Outcome.FAILED, message="CUDA error: device-side assert"
                    ).to_termination_message(),
                ),
            )
        ],
        None,
        summary(Outcome.FAILED, message="CUDA error: device-side assert"),
        "Failed",
        {"Failed": ("True", "BackoffLimitExceeded")},
        "CUDA error",
    ),
    (
        "preempted-waiting",
        job(active=1),
        [
            pod(
                "ft-a",
                "Failed",
                terminated=term(75, message=PREEMPTED.to_termination_message()),
                conditions=[{"type": "DisruptionTarget", "status": "True"}],
            ),
            pod("ft-b", "Pending", created="2026-01-01T12:02:00Z"),
        ],
        None,
        PREEMPTED,
        "Pending",
        {"Running": ("False", "PreemptedResuming")},
        "checkpoint",
    ),
    (
        "preempted-resumed",
        job(active=1),
        [
            pod("ft-a", "Failed", terminated=term(75, message=PREEMPTED.to_termination_message())),
            pod("ft-b", created="2026-01-01T12:02:00Z"),
        ],
        PROGRESS,
        PREEMPTED,
        "Running",
        {"Running": ("True", "PreemptedResuming")},
        "resumed after 1 preemption",
    ),
    (
        "suspended",
        job(("Suspended", "JobSuspended"), suspend=True, active=0),
        [],
        None,
        None,
        "Suspended",
        {"Suspended": ("True", "Suspended")},
        "suspended",
    ),
]


@pytest.mark.parametrize(
    ("job_obj", "pods", "progress", "summ", "phase", "conds", "fragment"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_derive_status(
    job_obj: Any,
    pods: Any,
    progress: Any,
    summ: Any,
    phase: str,
    conds: dict[str, tuple[str, str]],
    fragment: str | None,
) -> None:
    status = derive_status(SPEC, job_obj, pods, progress, summ, FineTuneJobStatus(), T1, 1)
    assert status.phase == phase
    for type_, (wire, reason) in conds.items():
        cond = get_condition(status.conditions, type_)
        assert cond is not None, type_
        assert (cond.status, cond.reason) == (wire, reason)
        assert cond.observed_generation == 1
    if fragment:
        messages = " ".join(c.message for c in status.conditions)
        assert fragment in messages


def test_succeeded_status_in_full() -> None:
    case = next(c for c in CASES if c[0] == "succeeded")
    status = derive_status(SPEC, case[1], case[2], None, OK, FineTuneJobStatus(), T1, 1)
    assert status_dict(status) == {
        "phase": "Succeeded",
        "conditions": [
            {
                "type": "Created",
                "status": "True",
                "reason": "JobCreated",
                "message": "created Job ft",
                "lastTransitionTime": "2026-01-01T12:05:00Z",
                "observedGeneration": 1,
            },
            {
                "type": "Succeeded",
                "status": "True",
                "reason": "Completed",
                "message": "training finished; adapter at s3://b/out/adapter",
                "lastTransitionTime": "2026-01-01T12:05:00Z",
                "observedGeneration": 1,
            },
            {
                "type": "Running",
                "status": "False",
                "reason": "Completed",
                "message": "training finished; adapter at s3://b/out/adapter",
                "lastTransitionTime": "2026-01-01T12:05:00Z",
                "observedGeneration": 1,
            },
        ],
        "checkpoints": [],
        "result": {
            "adapterUri": "s3://b/out/adapter",
            "outputUri": "s3://b/out",
            "metrics": {"evalLoss": 0.9, "perplexity": 2.46},
            "trainableParams": 1000,
            "trainedTokens": 50000,
        },
        "startTime": "2026-01-01T12:00:00Z",
        "completionTime": "2026-01-01T12:04:00Z",
        "attempts": 1,
        "jobName": "ft",
        "podName": "ft-a",
        "observedGeneration": 1,
    }


def test_progress_is_mirrored_with_eta() -> None:
    status = derive_status(SPEC, job(active=1), [pod()], PROGRESS, None, FineTuneJobStatus(), T1)
    assert status.progress is not None
    assert status.progress.model_dump(by_alias=True, exclude_none=True) == {
        "stage": "training",
        "step": 50,
        "totalSteps": 200,
        "percent": 25.0,
        "loss": 1.25,
        "etaSeconds": 3900.0,
        "eta": "1h05m",
        "updatedAt": T1,
    }


def test_the_trainers_estimate_becomes_status_estimate_and_stays() -> None:
    estimate = Estimate(
        peak_gib_per_gpu=38.5,
        gpu_gib=79.65,
        fits=True,
        batch_size=4,
        gradient_checkpointing=True,
        total_steps=200,
        expected_seconds_min=5210,
        expected_seconds_max=8052,
        gpu_hours_max=17.9,
    )
    reported = PROGRESS.model_copy(update={"estimate": estimate})
    status = derive_status(SPEC, job(active=1), [pod()], reported, None, FineTuneJobStatus(), T1)
    assert status.estimate == estimate
    wire = status_dict(status)["estimate"]
    assert wire["peakGibPerGpu"] == 38.5 and wire["fits"] is True and wire["gpuHoursMax"] == 17.9
    unreachable = derive_status(SPEC, job(active=1), [pod()], None, None, status, T1)
    assert unreachable.estimate == estimate  # the last report is kept while /progress is away


def test_observing_the_same_state_twice_changes_nothing() -> None:
    first = derive_status(SPEC, job(active=1), [pod()], PROGRESS, None, FineTuneJobStatus(), T0)
    again = derive_status(SPEC, job(active=1), [pod()], PROGRESS, None, first, T1)
    assert status_patch(status_dict(first), again) == {}


def test_operator_failures_are_final() -> None:
    failed = FineTuneJobStatus(
        phase="Failed",
        conditions=set_condition([], "Failed", True, "InvalidSpec", "spec.x: bad", T0),
    )
    assert derive_status(SPEC, job(active=1), [pod()], PROGRESS, None, failed, T1) == failed


def test_attempts_survive_pod_deletion() -> None:
    first = derive_status(SPEC, job(active=1), [pod("ft-a")], None, None, FineTuneJobStatus(), T0)
    second = derive_status(SPEC, job(active=1), [pod("ft-b")], None, None, first, T1)
    assert (first.attempts, second.attempts, second.pod_name) == (1, 2, "ft-b")


def test_condition_transition_time_changes_only_on_flip() -> None:
    conds = set_condition([], "Running", True, "Training", "step 1", T0)
    conds = set_condition(conds, "Running", True, "Training", "step 2", T1)
    assert conds[0].last_transition_time == T0 and conds[0].message == "step 2"
    conds = set_condition(conds, "Running", False, "Completed", "done", T1)
    assert conds[0].last_transition_time == T1 and len(conds) == 1


def test_checkpoints_bounded_and_best_marked() -> None:
    ckpts = [
        CheckpointInfo(step=s, uri=f"u/{s}", time=T0, eval_loss=(0.1 if s == 3 else 1.0))
        for s in range(1, 31)
    ]
    merged = merge_checkpoints([], ckpts, limit=5)
    assert [c.step for c in merged] == [3, 27, 28, 29, 30]
    assert [c.best for c in merged] == [True, False, False, False, False]


def test_a_full_fine_tune_reports_its_model_not_an_adapter() -> None:
    case = next(c for c in CASES if c[0] == "succeeded")
    full = OK.model_copy(update={"adapter_uri": None, "model_uri": "s3://b/out/model"})
    status = derive_status(SPEC, case[1], case[2], None, full, FineTuneJobStatus(), T1, 1)
    assert status.result is not None
    assert (status.result.model_uri, status.result.adapter_uri) == ("s3://b/out/model", None)
    succeeded = next(c for c in status.conditions if c.type == "Succeeded")
    assert succeeded.message == "training finished; model at s3://b/out/model"


def test_checkpoints_keep_the_best_the_trainer_marked_by_its_metric() -> None:
    """With earlyStopping on eval_accuracy the best checkpoint is not the lowest loss."""
    reported = [
        CheckpointInfo(step=s, uri=f"u/{s}", time=T0, eval_loss=loss, eval_accuracy=acc)
        for s, loss, acc in ((2, 0.2, 0.6), (4, 0.5, 0.9), (6, 0.4, 0.7), (8, 0.3, 0.8))
    ]
    marked = [c.model_copy(update={"best": c.step == 4}) for c in reported]
    merged = merge_checkpoints([], marked, limit=2)
    assert [(c.step, c.best) for c in merged] == [(4, True), (8, False)]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, None), (5, "5s"), (750, "12m30s"), (3900, "1h05m"), (2 * 86400 + 3 * 3600, "2d03h")],
)
def test_format_eta(seconds: float | None, text: str | None) -> None:
    assert format_eta(seconds) == text


def test_merge_patch() -> None:
    old = {"a": 1, "b": {"c": 2, "d": 3}, "e": [1], "gone": True}
    new = {"a": 1, "b": {"c": 2, "d": 4}, "e": [1, 2]}
    assert merge_patch(old, new) == {"b": {"d": 4}, "e": [1, 2], "gone": None}
    assert merge_patch(new, new) == {}


@pytest.mark.parametrize(
    ("extra", "reason"),
    [({"suspend": True}, "SuspendedByUser"), ({"queueName": "team-a"}, "WaitingForQueue")],
)
def test_suspension_reasons(extra: dict[str, Any], reason: str) -> None:
    spec = SPEC.model_copy(
        update={"suspend": extra.get("suspend", False), "queue_name": extra.get("queueName")}
    )
    status = derive_status(
        spec, job(suspend=True, active=0), [], None, None, FineTuneJobStatus(), T1
    )
    cond = get_condition(status.conditions, "Suspended")
    assert status.phase == "Suspended" and cond is not None and cond.reason == reason


def test_success_completes_the_last_progress() -> None:
    """The last /progress seen may be a step short; success shows the trainer's final count."""
    case = next(c for c in CASES if c[0] == "succeeded")
    running = derive_status(SPEC, job(active=1), [pod()], PROGRESS, None, FineTuneJobStatus(), T0)
    final = OK.model_copy(update={"steps": 200})
    done = derive_status(SPEC, case[1], case[2], None, final, running, T1, 1)
    assert done.progress is not None
    assert (done.progress.step, done.progress.percent, done.progress.eta) == (200, 100.0, "0s")
    assert done.progress.stage == "succeeded"


def test_every_reason_set_is_a_declared_constant() -> None:
    for case in CASES:
        status = derive_status(SPEC, *case[1:5], FineTuneJobStatus(), T1, 1)
        for cond in status.conditions:
            assert cond.reason in set(Reason), (case[0], cond.reason)


def test_an_unknown_job_failure_reason_is_job_failed_with_it_in_the_message() -> None:
    failed = job(("Failed", "FailedIndexes"), failed=1)
    status = derive_status(SPEC, failed, [], None, None, FineTuneJobStatus(), T1)
    cond = get_condition(status.conditions, "Failed")
    assert cond is not None and cond.reason == Reason.JOB_FAILED
    assert cond.message == "FailedIndexes: Failed FailedIndexes"


def test_every_reason_is_documented_in_the_operator_guide() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "operator.md").read_text()
    section = text.split("## Status", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([A-Za-z]+)` \|", section, re.MULTILINE))
    assert documented == {r.value for r in Reason}


def test_running_pod_is_the_newest_pod_whose_trainer_runs() -> None:
    done = pod("ft-a", "Failed", terminated=term(75))
    assert running_pod([]) is None
    assert running_pod([done]) is None
    assert running_pod([pod(phase="Pending")]) is None
    newer = pod("ft-b", created="2026-01-01T12:02:00Z")
    older = pod("ft-c", created="2026-01-01T12:01:00Z")
    assert running_pod([newer, done, older]) is newer
    exited = pod("ft-d", "Running", terminated=term(0), created="2026-01-01T12:03:00Z")
    assert running_pod([newer, exited]) is newer  # phase not updated yet, trainer exited


def _status(phase: Any, *conds: tuple[str, bool, str, str]) -> FineTuneJobStatus:
    conditions: list[Any] = []
    for type_, wire, reason, message in conds:
        conditions = set_condition(conditions, type_, wire, reason, message, T0)  # type: ignore[arg-type]
    return FineTuneJobStatus(phase=phase, conditions=conditions)


@pytest.mark.parametrize(
    ("before", "after", "event"),
    [
        (_status("Pending"), _status("Pending"), None),
        (_status(None), _status(None), None),
        (
            _status(None),
            _status("Pending", ("Running", False, "PodStarting", "waiting")),
            PhaseEvent(False, "PodStarting", "New -> Pending: waiting"),
        ),
        (
            _status("Pending"),
            _status("Running", ("Running", True, "Training", "the trainer is training")),
            PhaseEvent(False, "Training", "Pending -> Running: the trainer is training"),
        ),
        (
            _status("Running"),
            _status("Succeeded", ("Succeeded", True, "Completed", "training finished")),
            PhaseEvent(False, "Completed", "Running -> Succeeded: training finished"),
        ),
        (
            _status("Running"),
            _status(
                "Failed", ("Running", False, "OOMKilled", "x"), ("Failed", True, "OOMKilled", "oom")
            ),
            PhaseEvent(True, "OOMKilled", "Running -> Failed: oom"),
        ),
        (
            _status("Running"),
            _status("Suspended", ("Suspended", True, "SuspendedByUser", "spec.suspend")),
            PhaseEvent(False, "SuspendedByUser", "Running -> Suspended: spec.suspend"),
        ),
        (
            _status("Pending"),
            _status("ValidatingData", ("Running", True, "ValidatingData", "checking")),
            PhaseEvent(False, "ValidatingData", "Pending -> ValidatingData: checking"),
        ),
        (_status("Running"), _status("Failed"), PhaseEvent(True, "Failed", "Running -> Failed")),
    ],
    ids=[
        "same",
        "none",
        "first",
        "running",
        "succeeded",
        "failed-warning",
        "suspended",
        "validating",
        "no-condition",
    ],
)
def test_phase_event(
    before: FineTuneJobStatus, after: FineTuneJobStatus, event: PhaseEvent | None
) -> None:
    assert phase_event(before, after) == event


def test_blocked_status_waits_and_clears_on_the_next_derivation() -> None:
    blocked = blocked_status(FineTuneJobStatus(), "403 Forbidden: exceeded quota", T0, 1)
    running = get_condition(blocked.conditions, "Running")
    assert blocked.phase == "Pending" and running is not None
    assert (running.status, running.reason) == ("False", "Blocked")
    after = derive_status(SPEC, job(active=1), [pod()], PROGRESS, None, blocked, T1, 1)
    cond = get_condition(after.conditions, "Running")
    assert cond is not None and (cond.status, cond.reason) == ("True", "Training")


@pytest.mark.parametrize("reason", ["ChildRejected", "StatusRejected", "NameConflict"])
def test_operator_failures_stay_failed(reason: str) -> None:
    failed = failed_status(FineTuneJobStatus(), reason, "refused", T0, 1)
    again = derive_status(SPEC, job(active=1), [pod()], PROGRESS, None, failed, T1, 1)
    assert again == failed and again.phase == "Failed"


# --------------------------------------------------------------------------------------------
# a run of several pods (Indexed Job)
# --------------------------------------------------------------------------------------------
GROUP_SPEC = parse_spec(
    {
        "model": {"source": "hf://Qwen/Qwen2.5-0.5B"},
        "dataset": {"source": "s3://b/train.jsonl"},
        "output": {"uri": "s3://b/out"},
        "resources": {"gpus": 8, "nodes": 2},
    }
)


def indexed(index: int, **kw: Any) -> dict[str, Any]:
    found = pod(f"ft-{index}-x", **kw)
    found["metadata"]["annotations"] = {"batch.kubernetes.io/job-completion-index": str(index)}
    return found


def test_progress_is_read_from_the_pod_of_index_zero() -> None:
    zero, one = indexed(0), indexed(1, created="2026-01-01T12:00:05Z")
    assert running_pod([zero, one]) is zero
    assert running_pod([indexed(0, phase="Pending"), one]) is None  # rank 0 serves /progress


def test_a_groups_success_reports_rank_zeros_results() -> None:
    import json

    def done(index: int, result: Summary, created: str) -> dict[str, Any]:
        terminated = {
            "exitCode": 0,
            "message": json.dumps(result.model_dump(by_alias=True, mode="json")),
        }
        return indexed(index, phase="Succeeded", terminated=terminated, created=created)

    rank0 = summary(Outcome.SUCCEEDED, adapter_uri="s3://b/out/adapter")
    node1 = summary(
        Outcome.SUCCEEDED, message="node 1: ranks 8-15 finished; rank 0 reports the run"
    )
    pods = [done(0, rank0, "2026-01-01T12:00:00Z"), done(1, node1, "2026-01-01T12:00:09Z")]
    assert latest_summary(pods) == rank0
    failed = summary(Outcome.FAILED, reason="WorkerFailed", message="rank 9: killed by SIGKILL")
    pods.append(done(1, failed, "2026-01-01T12:00:10Z"))
    assert latest_summary(pods) == failed  # a failure is the newest word, whichever pod said it


def test_workers_count_the_running_pods_of_the_latest_attempt() -> None:
    retried = indexed(1, phase="Failed", terminated={"exitCode": 1})
    pods = [indexed(0), retried, indexed(1, created="2026-01-01T12:01:00Z")]
    found = workers_status(GROUP_SPEC, pods)
    assert found is not None and (found.ready, found.total, found.world_size) == (2, 2, 16)
    assert workers_status(SPEC, [pod()]) is None  # one worker: nothing to report
    status = derive_status(GROUP_SPEC, job(), pods, None, None, FineTuneJobStatus(), T1)
    assert status.workers == found
    assert status.attempts == 1  # one attempt of the group, however many pods it had


MLFLOW = TrackerInfo(name="mlflow", url="http://mlflow:5000/#/experiments/1/runs/abc")
TENSORBOARD = TrackerInfo(name="tensorboard", location="s3://b/out/tensorboard")


def test_tracking_links_from_the_start_of_training_to_the_result() -> None:
    running = Progress(phase=Phase.TRAINING, step=3, total_steps=10, trackers=[MLFLOW, TENSORBOARD])
    first = derive_status(SPEC, job(), [pod()], running, None, FineTuneJobStatus(), T0, 1)
    assert first.tracking == [MLFLOW, TENSORBOARD]
    cond = get_condition(first.conditions, "Tracking")
    assert cond is not None and (cond.status, cond.reason) == ("True", "Reporting")
    assert MLFLOW.url is not None and MLFLOW.url in cond.message
    # between polls (no progress), the links stay
    quiet = derive_status(SPEC, job(), [pod()], None, None, first, T1, 1)
    assert quiet.tracking == [MLFLOW, TENSORBOARD]
    # the end: the summary's links, also in the result
    done = summary(Outcome.SUCCEEDED, adapter_uri="s3://b/out/adapter", trackers=[MLFLOW])
    finished = pod(terminated={"exitCode": 0, "message": done.to_termination_message()})
    final = derive_status(
        SPEC, job(("Complete", "Completed"), succeeded=1), [finished], None, done, quiet, T1, 1
    )
    assert final.result is not None and final.result.tracking == [MLFLOW]
    assert final.tracking == [MLFLOW]
    assert tracking_event(quiet, final) is None


def test_a_tracker_that_stopped_reporting_is_a_condition_and_one_warning() -> None:
    ok = Progress(phase=Phase.TRAINING, step=3, trackers=[MLFLOW, TENSORBOARD])
    before = derive_status(SPEC, job(), [pod()], ok, None, FineTuneJobStatus(), T0, 1)
    down = MLFLOW.model_copy(update={"error": "step 4: MlflowException: connection refused"})
    failing = Progress(phase=Phase.TRAINING, step=5, trackers=[down, TENSORBOARD])
    after = derive_status(SPEC, job(), [pod()], failing, None, before, T1, 1)
    assert after.phase == "Running"  # training goes on
    cond = get_condition(after.conditions, "Tracking")
    assert cond is not None
    assert (cond.status, cond.reason) == ("False", "TrackerUnavailable")
    assert cond.message == "mlflow: step 4: MlflowException: connection refused (training went on)"
    assert tracking_event(before, after) == PhaseEvent(True, "TrackerUnavailable", cond.message)
    again = derive_status(SPEC, job(), [pod()], failing, None, after, T1, 1)
    assert tracking_event(after, again) is None  # once


def test_no_tracking_no_condition() -> None:
    status = derive_status(
        SPEC, job(), [pod()], Progress(phase=Phase.TRAINING), None, FineTuneJobStatus(), T0, 1
    )
    assert get_condition(status.conditions, "Tracking") is None and status.tracking is None


def test_finetune_status_shows_where_to_look() -> None:
    from finetune_operator.cli import render_status
    from rich.console import Console

    down = TENSORBOARD.model_copy(update={"error": "end: OSError: disk full"})
    status = FineTuneJobStatus(phase="Running", tracking=[MLFLOW, down])
    console = Console(width=200, record=True)
    console.print(render_status("ft", status, []))
    text = console.export_text()
    assert f"mlflow: {MLFLOW.url}" in text
    assert "tensorboard: s3://b/out/tensorboard  (stopped: end: OSError: disk full)" in text
