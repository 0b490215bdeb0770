"""Pure status derivation: observed Job, pods, trainer progress and summary -> FineTuneJobStatus.

Conditions are the truth; `phase` summarises them. `lastTransitionTime` changes only when a
condition's status flips. Nothing here does I/O: a FineTuneJob's task (`reconcile`) observes,
calls `derive_status` (one function per phase of the Job: succeeded, failed, suspended,
active), patches the difference (`status_patch`) and posts `phase_event`. Every reason is a
`reasons.Reason`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from finetune_trainer.progress import (
    CheckpointInfo,
    ExitCode,
    Outcome,
    Phase,
    Progress,
    Summary,
    TrackerInfo,
)

from finetune_operator.api import (
    Condition,
    ConditionType,
    FineTuneJobSpec,
    FineTuneJobStatus,
    JobPhase,
    ProgressStatus,
    ResultStatus,
    WorkersStatus,
)
from finetune_operator.builders import CONTAINER_NAME
from finetune_operator.reasons import OPERATOR_FAILURES, Reason

Obj = dict[str, Any]

MAX_CHECKPOINTS = 20
TERMINAL_PHASES: tuple[JobPhase, ...] = ("Succeeded", "Failed")
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
IMAGE_PULL_REASONS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName")
CONFIG_ERROR_REASONS = ("CreateContainerConfigError", "CreateContainerError")


# --------------------------------------------------------------------------------------------
# conditions
# --------------------------------------------------------------------------------------------
def get_condition(conditions: Iterable[Condition], type_: str) -> Condition | None:
    """The condition of this type, if any."""
    return next((c for c in conditions if c.type == type_), None)


def set_condition(
    conditions: list[Condition],
    type_: ConditionType,
    status: bool,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None = None,
) -> list[Condition]:
    """A new list with the condition set; its transition time kept unless the status flips."""
    wire = "True" if status else "False"
    old = get_condition(conditions, type_)
    new = Condition(
        type=type_,
        status=wire,
        reason=reason,
        message=message[:32768],
        last_transition_time=old.last_transition_time
        if old is not None and old.status == wire
        else now,
        observed_generation=generation,
    )
    if old is None:
        return [*conditions, new]
    return [new if c.type == type_ else c for c in conditions]


def clear_condition(
    conditions: list[Condition],
    type_: ConditionType,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None = None,
) -> list[Condition]:
    """Set a condition False, but only if it exists (do not add False noise)."""
    if get_condition(conditions, type_) is None:
        return conditions
    return set_condition(conditions, type_, False, reason, message, now, generation)


def is_true(conditions: Iterable[Condition], type_: str) -> bool:
    """Whether the condition exists and is True."""
    cond = get_condition(conditions, type_)
    return cond is not None and cond.status == "True"


def failed_status(
    previous: FineTuneJobStatus,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None = None,
) -> FineTuneJobStatus:
    """The status of a job the operator refuses to run (the reasons in OPERATOR_FAILURES)."""
    conditions = set_condition(
        previous.conditions, "Failed", True, reason, message, now, generation
    )
    conditions = clear_condition(conditions, "Running", reason, message, now, generation)
    return previous.model_copy(
        update={
            "phase": "Failed",
            "conditions": conditions,
            "completion_time": previous.completion_time or now,
            "observed_generation": generation,
        }
    )


# --------------------------------------------------------------------------------------------
# helpers over observed objects
# --------------------------------------------------------------------------------------------
def format_eta(seconds: float | None) -> str | None:
    """Seconds -> a short human ETA: 45s, 12m30s, 1h05m, 2d03h."""
    if seconds is None or seconds < 0:
        return None
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def _job_condition(job: Obj | None, type_: str) -> Obj | None:
    for cond in (job or {}).get("status", {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return dict(cond)
    return None


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return None


def sort_pods(pods: Iterable[Obj]) -> list[Obj]:
    """Pods oldest first (by creationTimestamp, then name)."""
    return sorted(
        pods,
        key=lambda p: (
            str(p.get("metadata", {}).get("creationTimestamp") or ""),
            str(p.get("metadata", {}).get("name") or ""),
        ),
    )


def trainer_status(pod: Obj) -> Obj:
    """The trainer container's status in a pod ({} when not reported yet)."""
    for cs in pod.get("status", {}).get("containerStatuses") or []:
        if cs.get("name") == CONTAINER_NAME:
            return dict(cs)
    return {}


def terminated_state(pod: Obj) -> Obj | None:
    """The trainer container's terminated state, if it has terminated."""
    state = trainer_status(pod).get("state") or {}
    terminated = state.get("terminated")
    return dict(terminated) if terminated else None


def pod_index(pod: Obj) -> int:
    """A pod's index in its Indexed Job (its node rank), 0 for the pod of a one-pod run."""
    annotations = pod.get("metadata", {}).get("annotations") or {}
    value = annotations.get(COMPLETION_INDEX_ANNOTATION, "0")
    return int(value) if str(value).isdigit() else 0


def is_running(pod: Obj) -> bool:
    """Phase Running and the trainer not terminated."""
    return pod.get("status", {}).get("phase") == "Running" and terminated_state(pod) is None


def running_pod(pods: Iterable[Obj]) -> Obj | None:
    """The newest pod whose trainer is running and which holds global rank 0 (index 0: it
    serves /progress)."""
    running = [p for p in sort_pods(pods) if is_running(p) and pod_index(p) == 0]
    return running[-1] if running else None


def pod_summary(pod: Obj) -> Summary | None:
    """The trainer's Summary from a pod's termination message, if it wrote one."""
    terminated = terminated_state(pod)
    return Summary.from_termination_message((terminated or {}).get("message"))


def latest_summary(pods: Iterable[Obj]) -> Summary | None:
    """The Summary of the most recent pod that terminated with one; for a success, rank 0's
    (pod index 0 reports the run's results; the other pods only say they finished)."""
    ordered = sort_pods(pods)
    newest = next((s for p in reversed(ordered) if (s := pod_summary(p)) is not None), None)
    if newest is None or newest.outcome != Outcome.SUCCEEDED:
        return newest
    for pod in reversed(ordered):
        summary = pod_summary(pod)
        if pod_index(pod) == 0 and summary is not None and summary.outcome == Outcome.SUCCEEDED:
            return summary
    return newest


def workers_status(spec: FineTuneJobSpec, pods: Iterable[Obj]) -> WorkersStatus | None:
    """Ready and total pods of a run of several workers (None for a single worker)."""
    res = spec.resources
    if res.workers == 1:
        return None
    newest: dict[int, Obj] = {}
    for pod in sort_pods(pods):
        newest[pod_index(pod)] = pod
    ready = sum(1 for p in newest.values() if is_running(p))
    return WorkersStatus(ready=ready, total=res.nodes, world_size=res.workers)


def _has_pod_condition(pod: Obj, type_: str) -> bool:
    return any(
        c.get("type") == type_ and c.get("status") == "True"
        for c in pod.get("status", {}).get("conditions") or []
    )


def is_preempted(pod: Obj) -> bool:
    """A pod that was disrupted (DisruptionTarget) or whose trainer exited 'preempted'."""
    terminated = terminated_state(pod)
    if terminated is not None and terminated.get("exitCode") == ExitCode.PREEMPTED:
        return True
    return _has_pod_condition(pod, "DisruptionTarget") and pod.get("status", {}).get("phase") in (
        "Failed",
        "Succeeded",
    )


def is_oom_killed(pod: Obj) -> bool:
    """A pod whose trainer was killed for exceeding its memory limit."""
    terminated = terminated_state(pod)
    return terminated is not None and terminated.get("reason") == "OOMKilled"


def _pending_reason(pod: Obj) -> tuple[str, str] | None:
    """Why a pod is not running yet, if a user can act on it."""
    waiting = (trainer_status(pod).get("state") or {}).get("waiting") or {}
    reason = waiting.get("reason")
    if reason in IMAGE_PULL_REASONS:
        image = pod.get("spec", {}).get("containers", [{}])[0].get("image", "")
        return (
            Reason.IMAGE_PULL_BACK_OFF,
            f"cannot pull trainer image {image}: {waiting.get('message') or reason}",
        )
    if reason in CONFIG_ERROR_REASONS:
        return (Reason.CREATE_CONTAINER_CONFIG_ERROR, waiting.get("message") or reason)
    for cond in pod.get("status", {}).get("conditions") or []:
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            return (
                Reason.UNSCHEDULABLE,
                "no node fits the trainer pod (GPUs, gpuType, nodeSelector, tolerations): "
                + (cond.get("message") or ""),
            )
    return None


def _progress_status(progress: Progress) -> ProgressStatus:
    percent = progress.percent
    if percent is None and progress.total_steps:
        percent = round(min(100.0, 100.0 * progress.step / progress.total_steps), 1)
    return ProgressStatus(
        stage=progress.phase.value,
        step=progress.step,
        total_steps=progress.total_steps,
        epoch=progress.epoch,
        percent=percent,
        loss=progress.loss,
        eval_loss=progress.eval_loss,
        learning_rate=progress.learning_rate,
        tokens_per_second=progress.tokens_per_second,
        eta_seconds=progress.eta_seconds,
        eta=format_eta(progress.eta_seconds),
        trained_tokens=progress.trained_tokens,
        updated_at=progress.updated_at,
    )


def merge_checkpoints(
    previous: Iterable[CheckpointInfo], new: Iterable[CheckpointInfo], limit: int = MAX_CHECKPOINTS
) -> list[CheckpointInfo]:
    """Union by step (newest report wins), the last `limit` kept, the best kept and marked: the
    one the trainer marked (by the run's metric; a later best has a later step), else the
    lowest eval loss."""
    by_step = {c.step: c for c in previous}
    for c in new:
        by_step[c.step] = c
    ordered = [by_step[s] for s in sorted(by_step)]
    marked = [c for c in ordered if c.best]
    evaluated = [c for c in ordered if c.eval_loss is not None]
    best = marked[-1] if marked else None
    if best is None and evaluated:
        best = min(evaluated, key=lambda c: c.eval_loss or 0.0)
    kept = ordered[-limit:]
    if best is not None and best not in kept:
        kept = [best, *ordered[-(limit - 1) :]] if limit > 1 else [best]
    return [c.model_copy(update={"best": best is not None and c.step == best.step}) for c in kept]


# --------------------------------------------------------------------------------------------
# derive_status: shared bookkeeping, then one function per phase
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Observation:
    """What one pass saw of a FineTuneJob whose Job exists (pods oldest first)."""

    spec: FineTuneJobSpec
    job: Obj
    pods: list[Obj]
    progress: Progress | None
    summary: Summary | None
    previous: FineTuneJobStatus
    now: datetime
    generation: int | None

    def set(
        self, conds: list[Condition], type_: ConditionType, status: bool, reason: str, msg: str
    ) -> list[Condition]:
        """set_condition at this pass's time and generation."""
        return set_condition(conds, type_, status, reason, msg, self.now, self.generation)

    def clear(
        self, conds: list[Condition], type_: ConditionType, reason: str, msg: str
    ) -> list[Condition]:
        """clear_condition at this pass's time and generation."""
        return clear_condition(conds, type_, reason, msg, self.now, self.generation)

    @property
    def job_status(self) -> Obj:
        return dict(self.job.get("status") or {})

    @property
    def lead_pods(self) -> list[Obj]:
        """The pods of index 0, oldest first: one per attempt (every pod for a one-pod run;
        in a several-pod run each attempt restarts the whole group)."""
        return [p for p in self.pods if pod_index(p) == 0]

    @property
    def preemptions(self) -> int:
        return sum(1 for p in self.lead_pods if is_preempted(p))


# (phase, conditions, other status fields) decided by one phase function
PhaseResult = tuple[JobPhase, list[Condition], dict[str, Any]]


def _failure(obs: Observation) -> tuple[str, str]:
    """(reason, message) for a failed Job, in terms a user can act on."""
    spec, summary = obs.spec, obs.summary
    cond = _job_condition(obs.job, "Failed") or {}
    job_reason = cond.get("reason") or ""
    last = obs.pods[-1] if obs.pods else None
    if summary is not None and summary.outcome == Outcome.INVALID_INPUT:
        return Reason.INVALID_INPUT, (
            summary.message or summary.reason or "the trainer rejected its input"
        )
    if job_reason == "DeadlineExceeded":
        return (
            Reason.DEADLINE_EXCEEDED,
            f"the run exceeded spec.activeDeadlineSeconds ({spec.active_deadline_seconds}s); "
            "resume from the last checkpoint with a longer deadline",
        )
    if last is not None and is_oom_killed(last):
        return (
            Reason.OOM_KILLED,
            "the trainer was killed for exceeding its memory limit "
            f"(spec.resources.memory={spec.resources.memory or 'unset'}); raise it, or lower "
            "training.batchSize / dataset.maxSeqLength",
        )
    terminated = terminated_state(last) if last is not None else None
    if terminated is not None and terminated.get("exitCode") == ExitCode.INVALID_INPUT:
        return Reason.INVALID_INPUT, (terminated.get("message") or "the trainer rejected its input")
    trainer_message = ""
    if summary is not None and summary.message:
        trainer_message = summary.message
    elif terminated is not None and terminated.get("message"):
        trainer_message = str(terminated["message"])[-2000:]
    if job_reason == "BackoffLimitExceeded":
        return (
            Reason.BACKOFF_LIMIT_EXCEEDED,
            f"the trainer failed {spec.backoff_limit + 1} times (spec.backoffLimit="
            f"{spec.backoff_limit})"
            + (f"; last error: {trainer_message}" if trainer_message else ""),
        )
    message = cond.get("message") or "the Job failed"
    if job_reason:
        message = f"{job_reason}: {message}"
    if trainer_message:
        message = f"{message}; trainer: {trainer_message}"
    return Reason.JOB_FAILED, message


def _result(summary: Summary | None) -> ResultStatus | None:
    if summary is None:
        return None
    return ResultStatus(
        adapter_uri=summary.adapter_uri,
        model_uri=summary.model_uri,
        merged_model_uri=summary.merged_model_uri,
        output_uri=summary.output_uri,
        metrics=dict(summary.metrics) or None,
        trainable_params=summary.trainable_params,
        trained_tokens=summary.trained_tokens,
        tracking=summary.trackers or None,
    )


def _succeeded(obs: Observation, conds: list[Condition]) -> PhaseResult:
    summary, previous = obs.summary, obs.previous
    msg = "training finished"
    if summary is not None and summary.adapter_uri:
        msg = f"training finished; adapter at {summary.adapter_uri}"
    elif summary is not None and summary.model_uri:
        msg = f"training finished; model at {summary.model_uri}"
    conds = obs.set(conds, "Succeeded", True, Reason.COMPLETED, msg)
    conds = obs.set(conds, "Running", False, Reason.COMPLETED, msg)
    conds = obs.clear(conds, "Suspended", Reason.COMPLETED, msg)
    update: dict[str, Any] = {
        "result": _result(summary) or previous.result,
        "completion_time": previous.completion_time
        or _parse_time(obs.job_status.get("completionTime"))
        or obs.now,
    }
    if obs.progress is None and previous.progress is not None:
        last = previous.progress
        update["progress"] = last.model_copy(
            update={
                "step": (summary.steps if summary else None) or last.total_steps or last.step,
                "stage": Phase.SUCCEEDED.value,
                "percent": 100.0,
                "eta_seconds": 0,
                "eta": "0s",
            }
        )
    return "Succeeded", conds, update


def _failed(obs: Observation, conds: list[Condition]) -> PhaseResult:
    reason, msg = _failure(obs)
    conds = obs.set(conds, "Failed", True, reason, msg)
    conds = obs.set(conds, "Running", False, reason, msg)
    conds = obs.clear(conds, "Suspended", reason, msg)
    update: dict[str, Any] = {
        "completion_time": obs.previous.completion_time
        or _parse_time((_job_condition(obs.job, "Failed") or {}).get("lastTransitionTime"))
        or obs.now
    }
    if obs.summary is not None and obs.summary.outcome != Outcome.INVALID_INPUT:
        update["result"] = _result(obs.summary) or obs.previous.result
    return "Failed", conds, update


def _suspended(obs: Observation, conds: list[Condition]) -> PhaseResult:
    spec = obs.spec
    if spec.suspend:
        reason, msg = (
            Reason.SUSPENDED_BY_USER,
            "spec.suspend is true: pods stopped, checkpoints kept",
        )
    elif spec.queue_name:
        reason, msg = (
            Reason.WAITING_FOR_QUEUE,
            f"waiting for Kueue to admit it (queue {spec.queue_name})",
        )
    else:
        reason, msg = Reason.SUSPENDED, "the Job is suspended"
    conds = obs.set(conds, "Suspended", True, reason, msg)
    conds = obs.set(conds, "Running", False, reason, msg)
    return "Suspended", conds, {}


def _running(obs: Observation, conds: list[Condition]) -> PhaseResult:
    stage = obs.progress.phase if obs.progress is not None else None
    if stage == Phase.VALIDATING_DATA:
        conds = obs.set(
            conds, "Running", True, Reason.VALIDATING_DATA, "the trainer is checking the dataset"
        )
        return "ValidatingData", conds, {}
    resumed = ""
    if count := obs.preemptions:
        resumed = f" (resumed after {count} preemption{'s' if count > 1 else ''})"
    reason = Reason.PREEMPTED_RESUMING if obs.preemptions else Reason.TRAINING
    msg = f"the trainer is {stage.value if stage else 'running'}{resumed}"
    return "Running", obs.set(conds, "Running", True, reason, msg), {}


def _waiting(obs: Observation) -> tuple[str, str]:
    """(reason, message) while no trainer pod runs."""
    current = obs.pods[-1] if obs.pods else None
    pending = _pending_reason(current) if current is not None else None
    if pending is not None:
        return pending
    last_done = next((p for p in reversed(obs.pods) if terminated_state(p)), None)
    if last_done is not None and is_preempted(last_done):
        return (
            Reason.PREEMPTED_RESUMING,
            "the trainer was preempted after saving a checkpoint; a new pod resumes it",
        )
    if last_done is not None and is_oom_killed(last_done):
        return (
            Reason.OOM_KILLED,
            "the last attempt was OOM-killed; retrying (raise spec.resources.memory "
            "or lower training.batchSize)",
        )
    if last_done is not None:
        return Reason.RETRYING, "the last attempt failed; the Job retries"
    return Reason.POD_STARTING, "waiting for the trainer pod to start"


def _active(obs: Observation, conds: list[Condition]) -> PhaseResult:
    conds = obs.clear(conds, "Suspended", Reason.RESUMED, "the Job was resumed")
    if running_pod(obs.pods) is not None:
        return _running(obs, conds)
    reason, msg = _waiting(obs)
    return "Pending", obs.set(conds, "Running", False, reason, msg), {}


def _job_phase(obs: Observation) -> Callable[[Observation, list[Condition]], PhaseResult]:
    """Which phase function applies to the observed Job."""
    job, summary = obs.job, obs.summary
    if _job_condition(job, "Complete") is not None or (
        obs.job_status.get("succeeded")
        and summary is not None
        and summary.outcome == Outcome.SUCCEEDED
    ):
        return _succeeded
    if _job_condition(job, "Failed") is not None:
        return _failed
    if job.get("spec", {}).get("suspend") and not obs.job_status.get("active"):
        return _suspended
    return _active


def _attempts(obs: Observation) -> dict[str, Any]:
    """Job name, attempts, latest pod (of index 0), preemptions, start time and workers."""
    previous = obs.previous
    lead = obs.lead_pods
    latest_pod = lead[-1]["metadata"]["name"] if lead else None
    attempts = max(previous.attempts or 0, len(lead))
    if latest_pod is not None and latest_pod != previous.pod_name and previous.pod_name:
        attempts = max(attempts, (previous.attempts or 0) + 1)
    return {
        "job_name": obs.job.get("metadata", {}).get("name"),
        "attempts": attempts or None,
        "pod_name": latest_pod or previous.pod_name,
        "preemptions": max(previous.preemptions or 0, obs.preemptions) or None,
        "start_time": previous.start_time or _parse_time(obs.job_status.get("startTime")),
        "workers": workers_status(obs.spec, obs.pods),
    }


def _reported(
    previous: FineTuneJobStatus, progress: Progress | None, summary: Summary | None
) -> dict[str, Any]:
    """Progress and checkpoints: what the trainer reports, else the last known."""
    update: dict[str, Any] = {}
    if progress is not None:
        update["progress"] = _progress_status(progress)
    if progress is not None and progress.estimate is not None:
        update["estimate"] = progress.estimate
    checkpoints = list(previous.checkpoints)
    if progress is not None and progress.checkpoints:
        checkpoints = merge_checkpoints(checkpoints, progress.checkpoints)
    if summary is not None and summary.last_checkpoint is not None:
        checkpoints = merge_checkpoints(checkpoints, [summary.last_checkpoint])
    update["checkpoints"] = checkpoints
    if progress is not None and progress.trackers:
        update["tracking"] = list(progress.trackers)
    elif summary is not None and summary.trackers:
        update["tracking"] = list(summary.trackers)
    return update


def tracking_condition(
    conditions: list[Condition], tracking: list[TrackerInfo], now: datetime, generation: int | None
) -> list[Condition]:
    """Condition Tracking: True while every tracker reports, False (TrackerUnavailable, the
    trackers' errors) once one stopped; absent for a run without trackers."""
    if not tracking:
        return conditions
    failed = [t for t in tracking if t.error]
    if not failed:
        where = ", ".join(f"{t.name} {t.url or t.location or ''}".strip() for t in tracking)
        return set_condition(conditions, "Tracking", True, Reason.REPORTING, where, now, generation)
    message = "; ".join(f"{t.name}: {t.error}" for t in failed) + " (training went on)"
    return set_condition(
        conditions, "Tracking", False, Reason.TRACKER_UNAVAILABLE, message, now, generation
    )


def derive_status(
    spec: FineTuneJobSpec,
    job: Obj | None,
    pods: list[Obj],
    progress: Progress | None,
    summary: Summary | None,
    previous: FineTuneJobStatus,
    now: datetime,
    generation: int | None = None,
) -> FineTuneJobStatus:
    """The status a FineTuneJob should have, given what was observed.

    `job`: its batch/v1 Job (None: not created yet); `pods`: the Job's pods; `progress`: the
    running trainer's /progress (None: not reachable); `summary`: the last trainer termination
    message; `previous`: the current status; `generation`: metadata.generation.
    """
    failed = get_condition(previous.conditions, "Failed")
    if failed is not None and failed.status == "True" and failed.reason in OPERATOR_FAILURES:
        return previous
    if previous.phase in TERMINAL_PHASES and job is None:
        return previous  # finished, and the Job is gone (TTL, manual cleanup): keep the record
    update = {"observed_generation": generation, **_reported(previous, progress, summary)}
    if job is None:
        return previous.model_copy(update={**update, "phase": previous.phase or "Pending"})
    obs = Observation(spec, job, sort_pods(pods), progress, summary, previous, now, generation)
    conds = obs.set(
        list(previous.conditions),
        "Created",
        True,
        Reason.JOB_CREATED,
        f"created Job {job['metadata']['name']}",
    )
    phase, conds, extra = _job_phase(obs)(obs, conds)
    conds = tracking_condition(
        conds, update.get("tracking", previous.tracking) or [], now, generation
    )
    return previous.model_copy(
        update={**update, **_attempts(obs), **extra, "phase": phase, "conditions": conds}
    )


# --------------------------------------------------------------------------------------------
# statuses the operator sets itself, and the Events of phase transitions
# --------------------------------------------------------------------------------------------
def blocked_status(
    previous: FineTuneJobStatus, message: str, now: datetime, generation: int | None = None
) -> FineTuneJobStatus:
    """A job waiting because the API server forbids creating its children for now (403)."""
    conditions = set_condition(
        previous.conditions, "Running", False, Reason.BLOCKED, message, now, generation
    )
    return previous.model_copy(
        update={
            "phase": previous.phase or "Pending",
            "conditions": conditions,
            "observed_generation": generation,
        }
    )


class PhaseEvent(NamedTuple):
    """A Kubernetes Event about a FineTuneJob."""

    warning: bool
    reason: str
    message: str


def phase_event(previous: FineTuneJobStatus, new: FineTuneJobStatus) -> PhaseEvent | None:
    """The Event announcing a phase transition (None when the phase did not change): its reason
    is the reason of the condition that explains the new phase; a Warning for Failed."""
    if new.phase == previous.phase or new.phase is None:
        return None
    cond_type = {"Succeeded": "Succeeded", "Failed": "Failed", "Suspended": "Suspended"}.get(
        new.phase, "Running"
    )
    cond = get_condition(new.conditions, cond_type)
    reason = cond.reason if cond is not None else new.phase
    message = f"{previous.phase or 'New'} -> {new.phase}" + (
        f": {cond.message}" if cond is not None and cond.message else ""
    )
    return PhaseEvent(new.phase == "Failed", reason, message)


def tracking_event(previous: FineTuneJobStatus, new: FineTuneJobStatus) -> PhaseEvent | None:
    """A Warning when a tracker stops reporting (condition Tracking turns False)."""
    before = get_condition(previous.conditions, "Tracking")
    after = get_condition(new.conditions, "Tracking")
    if after is None or after.status != "False" or (before and before.status == "False"):
        return None
    return PhaseEvent(True, after.reason, after.message)


# --------------------------------------------------------------------------------------------
# patching
# --------------------------------------------------------------------------------------------
def status_dict(status: FineTuneJobStatus) -> Obj:
    """The status as it is stored in the API (camelCase JSON, unset fields omitted)."""
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)


def merge_patch(old: Obj, new: Obj) -> Obj:
    """An RFC 7386 merge patch turning `old` into `new` ({} when equal)."""
    patch: Obj = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            sub = merge_patch(before, value)
            if sub:
                patch[key] = sub
        elif value != before:
            patch[key] = value
    return patch


def status_patch(old: Obj, new: FineTuneJobStatus) -> Obj:
    """The merge patch of `.status` from its stored form to `new` ({} when nothing changed)."""
    return merge_patch(old, status_dict(new))


def parse_status(raw: Obj | None) -> FineTuneJobStatus:
    """The stored status (tolerant: an unreadable status counts as empty)."""
    try:
        return FineTuneJobStatus.model_validate(raw or {})
    except ValueError:
        return FineTuneJobStatus()
