"""Platform policy: what the platform team allows, read from the operator's environment.

    FINETUNE_DEFAULT_IMAGE            trainer image when spec.resources.image is not set
    FINETUNE_ALLOW_TRUST_REMOTE_CODE  allow spec.model.trustRemoteCode: true (default false)
    FINETUNE_MAX_GPUS_PER_JOB         upper bound of GPUs per job: gpus x nodes (default 8)
    FINETUNE_ALLOWED_NAMESPACES       comma-separated namespaces allowed to run jobs (empty: all)
    FINETUNE_POLL_INTERVAL_SECONDS    how often a running trainer's /progress is polled (default 5)
    FINETUNE_MAX_GPU_HOURS_PER_JOB    cap on a job's estimated GPU-hours (the trainer's estimate
                                      before loading weights; over it: refused, exit 65)
    FINETUNE_TRAINER_ENV              a JSON object of extra environment variables for every
                                      trainer container, e.g. NCCL settings of the cluster's
                                      network: {"NCCL_SOCKET_IFNAME": "eth0"} (default none)

Violations are reported like spec validation errors: one ``field.path: message`` line each.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from finetune_operator.api import ConfigError, FineTuneJobSpec, parse_spec
from finetune_operator.uris import uri_values

DEFAULT_IMAGE = "ghcr.io/finetune-dev/finetune-trainer:0.1.0"
_TRUE = {"1", "true", "yes", "on"}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)


class Policy(BaseModel):
    """The operator's platform policy."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    default_image: str = Field(default=DEFAULT_IMAGE, min_length=1)
    allow_trust_remote_code: bool = False
    max_gpus_per_job: int = Field(default=8, ge=0)
    allowed_namespaces: tuple[str, ...] = ()
    poll_interval_seconds: float = Field(default=5.0, gt=0)
    trainer_env: dict[str, str] = Field(default_factory=dict)
    max_gpu_hours_per_job: float | None = Field(default=None, gt=0)

    @field_validator("trainer_env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        if bad := [name for name in env if not _ENV_NAME.match(name)]:
            raise ValueError(f"FINETUNE_TRAINER_ENV: not environment variable names: {bad}")
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Policy:
        """Read the policy from environment variables (unset or empty: the default)."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        if image := env.get("FINETUNE_DEFAULT_IMAGE", "").strip():
            values["default_image"] = image
        if trust := env.get("FINETUNE_ALLOW_TRUST_REMOTE_CODE", "").strip():
            values["allow_trust_remote_code"] = trust.lower() in _TRUE
        if gpus := env.get("FINETUNE_MAX_GPUS_PER_JOB", "").strip():
            values["max_gpus_per_job"] = int(gpus)
        if namespaces := env.get("FINETUNE_ALLOWED_NAMESPACES", "").strip():
            values["allowed_namespaces"] = tuple(
                ns.strip() for ns in namespaces.split(",") if ns.strip()
            )
        if interval := env.get("FINETUNE_POLL_INTERVAL_SECONDS", "").strip():
            values["poll_interval_seconds"] = float(interval)
        if hours := env.get("FINETUNE_MAX_GPU_HOURS_PER_JOB", "").strip():
            values["max_gpu_hours_per_job"] = float(hours)
        if trainer_env := env.get("FINETUNE_TRAINER_ENV", "").strip():
            values["trainer_env"] = json.loads(trainer_env)
        return cls.model_validate(values)


def pvc_uris(spec: FineTuneJobSpec) -> list[tuple[str, str]]:
    """(field path, URI) of every pvc:// URI in the spec, from every `Uri` field (`uris`)."""
    return [(path, uri) for path, uri in uri_values(spec) if uri.startswith("pvc://")]


def pvc_claim(uri: str) -> str:
    """The claim name of a pvc://CLAIM/path URI."""
    return uri.removeprefix("pvc://").split("/", 1)[0]


def check_policy(spec: FineTuneJobSpec, namespace: str, policy: Policy) -> list[str]:
    """Policy violations and cluster-only spec errors, as ``field.path: message`` lines."""
    errors: list[str] = []
    if policy.allowed_namespaces and namespace not in policy.allowed_namespaces:
        errors.append(
            f"metadata.namespace: namespace {namespace!r} may not run FineTuneJobs "
            f"(platform policy allows: {', '.join(policy.allowed_namespaces)})"
        )
    if spec.model.trust_remote_code and not policy.allow_trust_remote_code:
        errors.append(
            "spec.model.trustRemoteCode: running code shipped with a model is disabled by "
            "the platform policy (ask your platform team to set allowTrustRemoteCode)"
        )
    gpus = spec.resources.gpus * spec.resources.nodes
    if gpus > policy.max_gpus_per_job:
        one_pod = spec.resources.nodes == 1
        field, count = (
            ("gpus", f"{gpus} GPUs")
            if one_pod
            else ("nodes", f"{gpus} GPUs ({spec.resources.nodes} pods x {spec.resources.gpus})")
        )
        errors.append(
            f"spec.resources.{field}: {count} exceeds the platform maximum of "
            f"{policy.max_gpus_per_job} per job"
        )
    for path, uri in pvc_uris(spec):
        claim = pvc_claim(uri)
        if not claim or len(claim) > 253 or not _DNS1123_SUBDOMAIN.match(claim):
            errors.append(
                f"{path}: {uri!r} does not name a valid PersistentVolumeClaim "
                "(pvc://CLAIM/path, CLAIM a lowercase DNS name)"
            )
    return errors


def validate(
    raw_spec: dict[str, Any], namespace: str, policy: Policy
) -> tuple[FineTuneJobSpec | None, list[str]]:
    """Admit a FineTuneJob spec: (the parsed spec, []) or (None, ['field.path: message', ...])."""
    try:
        spec = parse_spec(copy.deepcopy(raw_spec))
    except ConfigError as exc:
        return None, list(exc.errors)
    errors = check_policy(spec, namespace, policy)
    return (None, errors) if errors else (spec, [])
