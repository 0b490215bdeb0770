"""What the operator keeps of the objects it watches: only the fields it reads.

A real API server's objects carry much the operator never looks at: `managedFields` on every
object, kubectl's `last-applied-configuration` annotation (a second copy of the spec), a Job's
whole pod template, a pod's volumes, env and scheduling. Kopf's indexes and the per-FineTuneJob
tasks hold one object per Job, pod and FineTuneJob for as long as it lives, so they hold these
views instead (docs/benchmarks.md, "Operator memory"). Each view keeps every field that
`status`, `reconcile` and `kube.progress_url` read, and kopf needs for owner references and
events; `tests/unit/test_views.py` checks that the status derived from a view equals the status
derived from the whole object.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from finetune_operator.builders import CONTAINER_NAME
from finetune_operator.status import COMPLETION_INDEX_ANNOTATION

Obj = dict[str, Any]

_METADATA = ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp")
_FINETUNEJOB_METADATA = (*_METADATA, "generation", "resourceVersion", "labels")
_JOB_SPEC = ("suspend", "completions", "parallelism", "backoffLimit", "completionMode")


def _pick(source: Mapping[str, Any] | None, keys: Iterable[str]) -> Obj:
    source = source or {}
    return {key: source[key] for key in keys if key in source}


def _metadata(body: Mapping[str, Any], keys: Iterable[str]) -> Obj:
    meta = body.get("metadata") or {}
    view = _pick(meta, keys)
    if refs := meta.get("ownerReferences"):
        view["ownerReferences"] = [dict(ref) for ref in refs]
    return view


def finetunejob_view(body: Mapping[str, Any]) -> Obj:
    """A FineTuneJob without annotations and managedFields: identity, labels (kopf copies them
    to the children), generation, spec and status."""
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": _metadata(body, _FINETUNEJOB_METADATA),
        "spec": dict(body.get("spec") or {}),
        "status": dict(body.get("status") or {}),
    }


def job_view(body: Mapping[str, Any]) -> Obj:
    """A batch/v1 Job: identity, owner, the few spec scalars status reads (no pod template),
    and its status."""
    return {
        "metadata": _metadata(body, _METADATA),
        "spec": _pick(body.get("spec"), _JOB_SPEC),
        "status": dict(body.get("status") or {}),
    }


def pod_view(body: Mapping[str, Any]) -> Obj:
    """A trainer pod: identity, its completion index, the trainer container's image and ports
    (where /progress is served), and its status."""
    meta = _metadata(body, _METADATA)
    index = ((body.get("metadata") or {}).get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION)
    if index is not None:
        meta["annotations"] = {COMPLETION_INDEX_ANNOTATION: index}
    containers = [
        _pick(container, ("name", "image", "ports"))
        for container in (body.get("spec") or {}).get("containers") or []
        if container.get("name") == CONTAINER_NAME
    ]
    return {
        "metadata": meta,
        "spec": {"containers": containers},
        "status": dict(body.get("status") or {}),
    }
