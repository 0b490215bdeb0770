"""The Argo CD health check (deploy/argocd/health.lua), run with lupa against sample objects.

Argo CD embeds gopher-lua (Lua 5.1): the script is run on Lua 5.1 and on 5.4. Sample statuses
are validated against the API's FineTuneJobStatus model so they stay realistic.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_operator.api import FineTuneJobStatus
from lupa import lua51, lua54

REPO_ROOT = Path(__file__).resolve().parents[2]
HEALTH_LUA = REPO_ROOT / "deploy" / "argocd" / "health.lua"
ARGOCD_CM = REPO_ROOT / "deploy" / "argocd" / "argocd-cm.yaml"
PLATFORM_GUIDE = REPO_ROOT / "docs" / "platform-guide.md"
HEALTH_KEY = "resource.customizations.health.finetune.dev_FineTuneJob"
T = "2026-01-01T00:00:00Z"

RUNTIMES = {"lua51": lua51.LuaRuntime, "lua54": lua54.LuaRuntime}


def _cond(ctype: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": T,
    }


def _job(status: dict[str, Any] | None, generation: int = 1) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "ml", "generation": generation},
        "spec": {"model": {"source": "hf://Qwen/Qwen2.5-0.5B"}},
    }
    if status is not None:
        FineTuneJobStatus.model_validate(status)  # samples must be valid statuses
        obj["status"] = status
    return obj


RUNNING: dict[str, Any] = {
    "phase": "Running",
    "observedGeneration": 1,
    "conditions": [
        _cond("Created", "True", "JobCreated", "created Job demo"),
        _cond("Running", "True", "Training", "training"),
        _cond("Succeeded", "False", "Running"),
        _cond("Failed", "False", "Running"),
    ],
    "progress": {"step": 120, "totalSteps": 600, "percent": 20.0, "loss": 1.2345, "eta": "5m"},
}
SUCCEEDED: dict[str, Any] = {
    "phase": "Succeeded",
    "observedGeneration": 1,
    "conditions": [
        _cond("Created", "True", "JobCreated"),
        _cond("Running", "False", "Completed"),
        _cond("Succeeded", "True", "Completed", "training finished"),
        _cond("Failed", "False", "Completed"),
    ],
    "result": {"adapterUri": "s3://bucket/run/adapter"},
}
FAILED: dict[str, Any] = {
    "phase": "Failed",
    "observedGeneration": 1,
    "conditions": [
        # A stale Running condition listed after Failed must not matter: filter by type.
        _cond("Failed", "True", "OOMKilled", "trainer ran out of memory (limit 32Gi)"),
        _cond("Succeeded", "False", "Failed"),
        _cond("Running", "False", "Failed"),
    ],
}
SUSPENDED: dict[str, Any] = {
    "phase": "Suspended",
    "observedGeneration": 2,
    "conditions": [
        _cond("Created", "True", "JobCreated"),
        _cond("Suspended", "True", "SuspendedByUser", "spec.suspend is true; checkpoints kept"),
    ],
}

CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("no status", _job(None), "Progressing", "Waiting for the operator"),
    (
        "pending",
        _job({"phase": "Pending", "observedGeneration": 1}),
        "Progressing",
        "Pending",
    ),
    (
        "validating data",
        _job({"phase": "ValidatingData", "observedGeneration": 1}),
        "Progressing",
        "ValidatingData",
    ),
    (
        "running",
        _job(RUNNING),
        "Progressing",
        "Running, step 120/600, 20%, loss 1.234, ETA 5m",
    ),
    ("succeeded", _job(SUCCEEDED), "Healthy", "adapter at s3://bucket/run/adapter"),
    (
        "failed",
        _job(FAILED),
        "Degraded",
        "OOMKilled: trainer ran out of memory (limit 32Gi)",
    ),
    (
        "failed phase without condition",
        _job({"phase": "Failed"}),
        "Degraded",
        "FineTuneJob failed",
    ),
    (
        "suspended",
        _job(SUSPENDED, generation=2),
        "Suspended",
        "SuspendedByUser: spec.suspend is true; checkpoints kept",
    ),
    (
        "suspend not yet observed",
        _job(RUNNING, generation=2),
        "Progressing",
        "observe generation 2",
    ),
    (
        "condition wins over stale phase",
        _job({**RUNNING, "conditions": [*RUNNING["conditions"][:3], FAILED["conditions"][0]]}),
        "Degraded",
        "OOMKilled",
    ),
]


def run_health(obj: dict[str, Any], runtime: str = "lua51") -> dict[str, str]:
    """Run health.lua the way Argo CD does: a global `obj`, the script returns `hs`."""
    lua = RUNTIMES[runtime]()
    lua.globals().obj = lua.table_from(copy.deepcopy(obj), recursive=True)
    result = lua.execute(HEALTH_LUA.read_text())
    return {k: v for k, v in dict(result).items()}


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize(("name", "obj", "status", "message"), CASES, ids=[c[0] for c in CASES])
def test_health(runtime: str, name: str, obj: dict[str, Any], status: str, message: str) -> None:
    hs = run_health(obj, runtime)
    assert hs["status"] == status, (name, hs)
    assert message in hs["message"], (name, hs)
    assert set(hs) == {"status", "message"}


def test_only_argo_health_statuses() -> None:
    allowed = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}
    assert {run_health(c[1])["status"] for c in CASES} <= allowed


def test_argocd_cm_snippet_embeds_the_script_verbatim() -> None:
    cm = yaml.safe_load(ARGOCD_CM.read_text())
    assert cm["kind"] == "ConfigMap"
    assert cm["metadata"]["name"] == "argocd-cm"
    assert cm["data"] == {HEALTH_KEY: HEALTH_LUA.read_text()}


def test_platform_guide_shows_the_current_snippet() -> None:
    text = PLATFORM_GUIDE.read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    snippets = [b for b in blocks if HEALTH_KEY in b]
    assert snippets, "docs/platform-guide.md has no argocd-cm snippet"
    assert yaml.safe_load(snippets[0])["data"][HEALTH_KEY] == HEALTH_LUA.read_text()
