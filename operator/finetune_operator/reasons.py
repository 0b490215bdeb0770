"""The reasons of FineTuneJob conditions: every one the operator sets, each documented in
docs/operator.md (a test keeps the two lists equal)."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """`status.conditions[].reason` values (and the reasons of the phase-transition Events)."""

    # refused by the operator before or while creating the children (final: never overwritten)
    INVALID_SPEC = "InvalidSpec"  # the spec or the platform policy rejects it
    NAME_CONFLICT = "NameConflict"  # a child's name is taken by an object it does not own
    CHILD_REJECTED = "ChildRejected"  # the API server refused a child (400, 404, 422, ...)
    STATUS_REJECTED = "StatusRejected"  # the API server refused the status the operator wrote
    # waiting
    BLOCKED = "Blocked"  # the API server forbids creating a child for now (403); retried
    JOB_CREATED = "JobCreated"  # the Job exists (condition Created)
    POD_STARTING = "PodStarting"  # the trainer pod is being scheduled or started
    UNSCHEDULABLE = "Unschedulable"  # no node fits the pod
    IMAGE_PULL_BACK_OFF = "ImagePullBackOff"  # the trainer image cannot be pulled
    CREATE_CONTAINER_CONFIG_ERROR = "CreateContainerConfigError"  # e.g. a missing Secret
    # running
    VALIDATING_DATA = "ValidatingData"  # the trainer checks the dataset
    TRAINING = "Training"  # the trainer runs (loading, training, evaluating, saving)
    PREEMPTED_RESUMING = "PreemptedResuming"  # preempted after a checkpoint; a new pod resumes
    OOM_KILLED = "OOMKilled"  # the trainer exceeded its memory limit
    RETRYING = "Retrying"  # the last attempt failed; the Job retries
    # suspended
    SUSPENDED_BY_USER = "SuspendedByUser"  # spec.suspend is true
    WAITING_FOR_QUEUE = "WaitingForQueue"  # Kueue has not admitted the Job yet
    SUSPENDED = "Suspended"  # the Job is suspended by someone else
    RESUMED = "Resumed"  # the Job runs again (condition Suspended turns False)
    # finished
    COMPLETED = "Completed"  # training finished
    INVALID_INPUT = "InvalidInput"  # the trainer rejected its config or dataset (exit 65)
    DEADLINE_EXCEEDED = "DeadlineExceeded"  # spec.activeDeadlineSeconds elapsed
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"  # retries exhausted
    JOB_FAILED = "JobFailed"  # the Job failed for another reason (its own reason in the message)
    # experiment trackers (condition Tracking)
    REPORTING = "Reporting"  # every tracker of spec.tracking receives the run
    TRACKER_UNAVAILABLE = "TrackerUnavailable"  # a tracker stopped reporting; training went on


# Failed reasons the operator sets itself: final, derive_status never overwrites them.
OPERATOR_FAILURES = frozenset(
    {Reason.INVALID_SPEC, Reason.NAME_CONFLICT, Reason.CHILD_REJECTED, Reason.STATUS_REJECTED}
)
