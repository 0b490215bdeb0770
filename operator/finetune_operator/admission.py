"""Admission of a FineTuneJob manifest as the cluster applies it, for `finetune validate` and
`finetune run`: the API server's object rules (apiVersion, kind, known top-level fields,
metadata.name and namespace), the CRD's schema and rules (the spec model, validated strictly
typed as the API server does: "8" is no integer) and the operator's own checks
(`finetune_operator.policy.validate`: the spec model and the platform policy, its defaults unless
the operator's FINETUNE_* variables are set).

Plugged into the trainer's CLI through the ``finetune.admission`` entry-point group, so the
trainer package never imports the operator. Imports neither kopf nor a Kubernetes client.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from finetune_trainer.config import format_errors, object_name_error
from pydantic import ValidationError

from finetune_operator.api import API_VERSION, KIND, FineTuneJobSpec
from finetune_operator.policy import Policy, validate

TOP_LEVEL_FIELDS = ("apiVersion", "kind", "metadata", "spec", "status")
DEFAULT_NAMESPACE = "default"
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _object_errors(manifest: dict[str, Any]) -> list[str]:
    errors = []
    if manifest.get("apiVersion") != API_VERSION:
        errors.append(f"apiVersion: expected {API_VERSION}, not {manifest.get('apiVersion')!r}")
    if manifest.get("kind") != KIND:
        errors.append(f"kind: expected {KIND}, not {manifest.get('kind')!r}")
    errors += [f"{key}: unknown field" for key in manifest if key not in TOP_LEVEL_FIELDS]
    metadata = manifest.get("metadata")
    if not isinstance(metadata, dict):
        return [*errors, "metadata: expected a mapping with a name"]
    problem = object_name_error(metadata.get("name"))
    if problem:
        errors.append(f"metadata.name: {problem}")
    namespace = metadata.get("namespace")
    if namespace is not None and not (
        isinstance(namespace, str) and len(namespace) <= 63 and _DNS1123_LABEL.fullmatch(namespace)
    ):
        errors.append("metadata.namespace: must be a lowercase DNS label of at most 63 characters")
    return errors


def _spec_errors(spec: Any, namespace: str, policy: Policy) -> list[str]:
    if not isinstance(spec, dict):
        return ["spec: expected a mapping"]
    try:  # the API server: typed values only (the model alone would coerce "8" to 8)
        FineTuneJobSpec.model_validate(copy.deepcopy(spec), strict=True)
    except ValidationError as exc:
        return format_errors(exc, "spec", FineTuneJobSpec)
    return validate(spec, namespace, policy)[1]


def admit(manifest: dict[str, Any], policy: Policy | None = None) -> list[str]:
    """Why the cluster would refuse `manifest`, one ``field.path: message`` line each; empty
    when it would admit it. `policy` defaults to the platform policy from the environment."""
    errors = _object_errors(manifest)
    metadata = manifest.get("metadata")
    namespace = metadata.get("namespace") if isinstance(metadata, dict) else None
    if policy is None:
        try:
            policy = Policy.from_env()
        except ValueError as exc:
            return [*errors, f"platform policy (FINETUNE_* environment): {exc}"]
    return errors + _spec_errors(
        manifest.get("spec"), namespace if isinstance(namespace, str) else DEFAULT_NAMESPACE, policy
    )
