"""End to end on a real API server: long names, deletion without the operator, and
`finetune validate` refusing exactly what the cluster refuses (opt-in: `--e2e`).

Like test_e2e_cluster.py, no trainer needs to run: the checks are the API server's admission
(schema, CEL, name rules), the operator's verdict (InvalidSpec or a created Job), the Job
controller creating pods, and the garbage collector.
"""

from __future__ import annotations

import copy
import secrets
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_kube import (
    FIELD_MANAGER,
    REPO_ROOT,
    Cluster,
    Obj,
    Operator,
    api_error_text,
    condition,
    quickstart_body,
    run_cli,
    start_operator,
    wait_for,
)
from finetune_operator.builders import JOB_LABEL
from finetune_operator.names import configmap_name, job_label, job_name
from finetune_trainer.progress import ExitCode
from kubernetes_asyncio.client.exceptions import ApiException

pytestmark = pytest.mark.e2e

TIMEOUT = 60.0
LONG_NAMES = {
    "100-chars": "long-" + "x" * 95,
    "253-chars": ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61]),
}
LEGACY_FINALIZER = "finetune.dev/finalizer"  # what versions with a kopf daemon put on objects


def status_of(cluster: Cluster, namespace: str, name: str) -> Obj:
    return dict((cluster.ftj(namespace, name) or {}).get("status") or {})


def created(cluster: Cluster, namespace: str, name: str) -> Obj | None:
    """The Created=True condition, once the operator has created the Job."""
    cond = condition(cluster.ftj(namespace, name), "Created")
    return cond if cond and cond.get("status") == "True" else None


# --------------------------------------------------------------------------------------------
# names the API server accepts for a FineTuneJob but not for its Job
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LONG_NAMES.values(), ids=LONG_NAMES.keys())
def test_a_long_name_gets_a_job_whose_pods_the_job_controller_creates(
    cluster: Cluster, operator: Operator, namespace: str, name: str
) -> None:
    """A Job named like a 100- or 253-character FineTuneJob would be refused (422: its pods'
    job-name label is limited to 63 characters), and the operator would retry forever. The
    operator names it `<prefix>-<hash>` instead; the Job controller creates its pod."""
    cluster.create_ftj(namespace, quickstart_body(namespace, name))
    wait_for(
        lambda: created(cluster, namespace, name),
        f"FineTuneJob {name[:20]}... to get Created=True",
        timeout=TIMEOUT,
        detail=lambda: status_of(cluster, namespace, name),
    )
    job = cluster.job(namespace, job_name(name))
    assert job is not None and len(job["metadata"]["name"]) <= 63
    assert cluster.configmap(namespace, configmap_name(name)) is not None
    assert status_of(cluster, namespace, name)["jobName"] == job_name(name)
    pods = wait_for(
        lambda: cluster.pods(namespace, f"{JOB_LABEL}={job_label(name)}"),
        "the Job controller to create the trainer pod",
        timeout=TIMEOUT,
        detail=lambda: [
            (e.get("reason"), e.get("message")) for e in cluster.events(namespace, job_name(name))
        ],
    )
    assert pods[0]["metadata"]["labels"]["job-name"] == job_name(name)
    assert condition(cluster.ftj(namespace, name), "Failed") is None


# --------------------------------------------------------------------------------------------
# deletion never waits for the operator
# --------------------------------------------------------------------------------------------
@pytest.fixture()
def own_namespace(cluster: Cluster, crd: Obj) -> Iterator[str]:
    """A namespace of this test's own (its deletion is part of the test)."""
    name = f"ftj-e2e-del-{secrets.token_hex(4)}"
    cluster.create_namespace(name, {"app.kubernetes.io/created-by": FIELD_MANAGER})
    wait_for(
        lambda: cluster.service_account(name, "default"),
        f"the default ServiceAccount of namespace {name}",
        timeout=30,
    )
    yield name
    cluster.delete_namespace(name)


def test_deleting_while_the_operator_is_down_is_not_stuck(
    cluster: Cluster, own_namespace: str, tmp_path: Path
) -> None:
    """With the operator stopped (uninstalled, crashed), deleting a FineTuneJob completes and
    its namespace is deleted too: no finalizer waits for the operator. A FineTuneJob that still
    carries the finalizer of an earlier version loses it while the operator runs."""
    ns = own_namespace
    names = ("orphan", "legacy")
    legacy = quickstart_body(ns, "legacy")
    legacy["metadata"]["finalizers"] = [LEGACY_FINALIZER]
    cluster.create_ftj(ns, legacy)
    operator = start_operator(ns, tmp_path)
    try:
        cluster.create_ftj(ns, quickstart_body(ns, "orphan"))
        for name in names:
            wait_for(
                partial(created, cluster, ns, name),
                f"{name} to get its Job",
                timeout=TIMEOUT,
                detail=operator.tail,
            )
        wait_for(
            lambda: not finalizers(cluster, ns, "legacy"),
            "the operator to remove the finalizer of earlier versions",
            timeout=TIMEOUT,
        )
    finally:
        operator.stop()
    uids = {}
    for name in names:
        job = cluster.job(ns, job_name(name))
        assert job is not None
        uids[name] = job["metadata"]["uid"]
        assert not finalizers(cluster, ns, name)
        cluster.delete_ftj(ns, name)
        wait_for(partial(gone, cluster.ftj, ns, name, None), f"{name} to be gone", timeout=30)
    for name in names:
        wait_for(
            partial(gone, cluster.job, ns, job_name(name), uids[name]),
            f"the Job of {name} to be garbage-collected",
            timeout=TIMEOUT,
        )
    cluster.delete_namespace(ns)
    wait_for(
        lambda: cluster.namespace(ns) is None,
        f"namespace {ns} to be deleted (not stuck Terminating)",
        timeout=180,
        detail=lambda: (cluster.namespace(ns) or {}).get("status"),
    )


def finalizers(cluster: Cluster, namespace: str, name: str) -> list[str]:
    return list(
        ((cluster.ftj(namespace, name) or {}).get("metadata") or {}).get("finalizers") or []
    )


def gone(
    read: Callable[[str, str], Obj | None], namespace: str, name: str, uid: str | None
) -> bool:
    """The object is deleted (or replaced by a new one of the same name, when `uid` is set)."""
    current = read(namespace, name)
    return current is None or (uid is not None and current["metadata"]["uid"] != uid)


# --------------------------------------------------------------------------------------------
# `finetune validate` refuses exactly what the cluster refuses
# --------------------------------------------------------------------------------------------
def _set(path: str, value: Any) -> Callable[[Obj], None]:
    """A change to a manifest: set the dotted `path` (creating objects on the way)."""

    def change(manifest: Obj) -> None:
        *parents, leaf = path.split(".")
        node = manifest
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    return change


def _classification_prefix(manifest: Obj) -> None:
    spec = manifest["spec"]
    spec["task"] = "sequence-classification"
    spec["dataset"] = {
        "source": "examples/data/reviews-sentiment.jsonl",
        "format": "classification",
        "validation": {"splitRatio": 0.15},
    }
    spec["method"] = {"type": "prefix"}


# (id, changes to examples/quickstart.yaml): each is valid or invalid the same way everywhere
ADMISSION_CASES: list[tuple[str, list[Callable[[Obj], None]]]] = [
    ("valid", []),
    ("long-name", [_set("metadata.name", LONG_NAMES["100-chars"])]),
    ("name-not-dns", [_set("metadata.name", "Not_A_Name")]),
    ("unknown-spec-field", [_set("spec.notAField", 1)]),
    ("local-output", [_set("spec.output.uri", "outputs/local")]),
    ("lora-on-full", [_set("spec.method", {"type": "full", "lora": {"r": 8}})]),
    ("kbit-two-gpus", [_set("spec.method", {"type": "qlora"}), _set("spec.resources.gpus", 2)]),
    (
        "fsdp-one-worker",
        [_set("spec.training.distributed", {"strategy": "fsdp"}), _set("spec.resources.gpus", 1)],
    ),
    ("two-nodes", [_set("spec.resources.nodes", 2)]),
    ("prefix-classification", [_classification_prefix]),
    ("trust-remote-code", [_set("spec.model.trustRemoteCode", True)]),
    ("invalid-claim", [_set("spec.output.uri", "pvc://Bad_Claim/out")]),
    ("too-many-gpus", [_set("spec.resources.gpus", 64)]),
]


def _server_verdict(cluster: Cluster, namespace: str, manifest: Obj) -> str:
    """'refused' (400/422 at admission), 'invalid' (the operator's InvalidSpec) or 'accepted'
    (the operator created the Job)."""
    name = manifest["metadata"]["name"]
    try:
        cluster.create_ftj(namespace, manifest)
    except ApiException as exc:
        assert exc.status in (400, 422), api_error_text(exc)
        return "refused"

    def verdict() -> str | None:
        failed = condition(cluster.ftj(namespace, name), "Failed")
        if failed and failed.get("status") == "True":
            assert failed["reason"] == "InvalidSpec", failed
            return "invalid"
        return "accepted" if created(cluster, namespace, name) else None

    return wait_for(
        verdict,
        f"the operator's verdict on {name[:30]}",
        timeout=TIMEOUT,
        detail=lambda: status_of(cluster, namespace, name),
    )


@pytest.mark.parametrize(("case", "changes"), ADMISSION_CASES, ids=[c[0] for c in ADMISSION_CASES])
def test_validate_refuses_exactly_what_the_cluster_refuses(
    cluster: Cluster,
    operator: Operator,
    namespace: str,
    tmp_path: Path,
    case: str,
    changes: list[Callable[[Obj], None]],
) -> None:
    """`finetune validate FILE` exits 65 exactly when the API server refuses the manifest
    (kubectl's strict field validation, schema, CEL, name rules) or the operator fails it with
    InvalidSpec (platform policy at its defaults); otherwise 0. The dataset is valid in every
    case, so only the spec decides."""
    manifest = copy.deepcopy(quickstart_body(namespace, f"adm-{case}"))
    for change in changes:
        change(manifest)
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    checked = run_cli("validate", str(path), cwd=REPO_ROOT, timeout=300)
    assert checked.returncode in (0, ExitCode.INVALID_INPUT), checked.stdout + checked.stderr
    verdict = _server_verdict(cluster, namespace, manifest)
    refused_locally = checked.returncode == ExitCode.INVALID_INPUT
    assert refused_locally == (verdict != "accepted"), (
        f"finetune validate exited {checked.returncode}, the cluster said {verdict}:\n"
        + checked.stdout
        + checked.stderr
    )
