"""Deleted FineTuneJobs leave nothing behind in the operator: no task, no mark, no metric."""

from __future__ import annotations

from finetune_operator import main as operator_main
from rest import custom_path
from test_operator_lifecycle import phase, spec


def test_deleted_finetunejobs_leave_no_task_behind(cluster, kubelet, operator) -> None:
    kubelet.env.update({"FAKE_STEPS": "1000", "FAKE_STEP_SECONDS": "0.2"})
    names = [f"gone-{i}" for i in range(4)]
    for name in names:
        cluster.apply_ftj(name, spec())
    for name in names:
        cluster.wait_for(lambda n=name: phase(cluster, n) == "Running", what=f"{name} Running")
    workers = operator_main.STATE.workers
    assert len(workers) == len(names)
    for name in names:
        cluster.delete(custom_path("default", name))
    cluster.wait_for(lambda: len(workers) == 0, what="every task stopped")
    cluster.wait_for(lambda: not workers._finished, what="no finished mark kept")
