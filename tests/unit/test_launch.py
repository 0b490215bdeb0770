"""The launcher's bookkeeping: the group from torchrun's variables, and one pod outcome from
its workers' outcomes (exit codes 65 and 75 survive; the first real failure is named)."""

from __future__ import annotations

import pytest
from finetune_trainer.launch import STOPPED_BY_LAUNCHER, Group, WorkerOutcome, merge_outcomes
from finetune_trainer.progress import ExitCode, Outcome, Summary

TWO_BY_TWO = Group(nnodes=2, nproc_per_node=2, node_rank=0)


def _summary(outcome: Outcome, reason: str, message: str = "") -> Summary:
    return Summary(outcome=outcome, reason=reason, message=message or None)


def test_group_reads_torchruns_variables_and_the_job_completion_index() -> None:
    group = Group.from_env(
        {
            "PET_NNODES": "3",
            "PET_NPROC_PER_NODE": "8",
            "JOB_COMPLETION_INDEX": "2",
            "PET_MASTER_ADDR": "ftj-0.ftj",
            "PET_MASTER_PORT": "29400",
        }
    )
    assert (group.world_size, group.node_rank, group.master_addr) == (24, 2, "ftj-0.ftj")
    assert list(group.ranks()) == list(range(16, 24))
    assert Group.from_env({"PET_NODE_RANK": "1", "JOB_COMPLETION_INDEX": "0"}).node_rank == 1
    assert Group.from_env({}).world_size == 1


def test_success_reports_rank_zeros_summary() -> None:
    done = _summary(Outcome.SUCCEEDED, "Succeeded", "all good")
    merged = merge_outcomes(TWO_BY_TWO, {0: WorkerOutcome(0, 0, done), 1: WorkerOutcome(1, 0)})
    assert merged == done


def test_success_on_a_pod_without_rank_zero_says_rank_zero_reports() -> None:
    group = Group(nnodes=2, nproc_per_node=2, node_rank=1)
    merged = merge_outcomes(group, {2: WorkerOutcome(2, 0), 3: WorkerOutcome(3, 0)})
    assert merged.outcome == Outcome.SUCCEEDED and "ranks 2-3" in (merged.message or "")


def test_invalid_input_on_any_rank_wins_over_the_others() -> None:
    invalid = _summary(Outcome.INVALID_INPUT, "InvalidInputError", "dataset line 3: no output")
    merged = merge_outcomes(
        TWO_BY_TWO,
        {
            0: WorkerOutcome(0, STOPPED_BY_LAUNCHER),
            1: WorkerOutcome(1, int(ExitCode.INVALID_INPUT), invalid),
        },
    )
    assert merged.exit_code() == ExitCode.INVALID_INPUT
    assert merged.message == "rank 1: dataset line 3: no output"


def test_the_first_own_failure_is_named_not_the_ranks_it_took_down() -> None:
    lost = _summary(Outcome.FAILED, "PeerLost", "lost another rank")
    merged = merge_outcomes(
        TWO_BY_TWO,
        {0: WorkerOutcome(0, 1, lost), 1: WorkerOutcome(1, -9)},
    )
    assert merged.exit_code() == ExitCode.FAILED
    assert merged.reason == "WorkerFailed"
    assert merged.message == "rank 1: killed by SIGKILL (out of memory?)"


def test_a_pod_that_only_lost_a_peer_says_so() -> None:
    lost = _summary(Outcome.FAILED, "PeerLost", "lost another rank")
    merged = merge_outcomes(
        TWO_BY_TWO, {0: WorkerOutcome(0, 1, lost), 1: WorkerOutcome(1, STOPPED_BY_LAUNCHER)}
    )
    assert (merged.reason, merged.message) == ("PeerLost", "rank 0: lost another rank")


def test_preemption_survives_the_launcher_with_rank_zeros_summary() -> None:
    saved = _summary(Outcome.PREEMPTED, "Preempted", "stopped at step 7 of 20; will resume")
    merged = merge_outcomes(
        TWO_BY_TWO,
        {
            0: WorkerOutcome(0, int(ExitCode.PREEMPTED), saved),
            1: WorkerOutcome(1, int(ExitCode.PREEMPTED), _summary(Outcome.PREEMPTED, "Preempted")),
        },
    )
    assert merged == saved and merged.exit_code() == ExitCode.PREEMPTED


@pytest.mark.parametrize("code", [1, -11, 3])
def test_a_crash_without_a_summary_is_a_retryable_failure(code: int) -> None:
    merged = merge_outcomes(TWO_BY_TWO, {0: WorkerOutcome(0, 0), 1: WorkerOutcome(1, code)})
    assert merged.exit_code() == ExitCode.FAILED
    assert (merged.message or "").startswith("rank 1: ")
