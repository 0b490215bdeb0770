"""Pure builders: a validated FineTuneJob spec -> the manifests of its children, as dicts.

No I/O, no kopf: the handlers add owner references (`kopf.adopt`) and create the objects.
Child names and label values come from `names` (valid for any FineTuneJob name); what the
trainer container gets (env, mounts, ports, exit codes) is the contract in docs/contract.md.
"""

from __future__ import annotations

import hashlib
from typing import Any

from finetune_trainer.progress import (
    CONFIG_PATH,
    ENV_CONFIG,
    ENV_HF_TOKEN,
    ENV_JOB_NAME,
    ENV_JOB_NAMESPACE,
    ENV_JOB_UID,
    ENV_MASTER_ADDR,
    ENV_MASTER_PORT,
    ENV_MAX_GPU_HOURS,
    ENV_NNODES,
    ENV_NPROC_PER_NODE,
    ENV_PROGRESS_PORT,
    ENV_PVC_ROOT,
    ENV_SHUTDOWN_TIMEOUT,
    ENV_TERMINATION_PATH,
    ENV_WANDB_API_KEY,
    PROGRESS_PATH,
    PROGRESS_PORT,
    PVC_ROOT,
    TERMINATION_MESSAGE_PATH,
    ExitCode,
)

from finetune_operator.api import GROUP, FineTuneJobSpec, SecretKeyRef, SecretsSpec
from finetune_operator.names import configmap_name, job_label, job_name, service_name
from finetune_operator.policy import Policy, pvc_claim, pvc_uris

Manifest = dict[str, Any]

JOB_LABEL = f"{GROUP}/job"
CONFIG_HASH_ANNOTATION = f"{GROUP}/config-hash"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
CONTAINER_NAME = "trainer"
PROGRESS_PORT_NAME = "progress"
CONFIG_KEY = "config.json"
CONFIG_DIR = CONFIG_PATH.rsplit("/", 1)[0]
DEFAULT_SHM_SIZE = "8Gi"
TERMINATION_GRACE_SECONDS = 300
# The launcher stops its workers this long after the pod's SIGTERM: inside the grace period,
# with time left to write the termination message and exit.
SHUTDOWN_TIMEOUT_SECONDS = TERMINATION_GRACE_SECONDS - 30
RENDEZVOUS_PORT = 29500
RENDEZVOUS_PORT_NAME = "rendezvous"
TRAINER_COMMAND = ["python", "-m", "finetune_trainer"]
RUN_AS_USER = 1000


def labels(name: str) -> dict[str, str]:
    """Labels on every child of FineTuneJob `name` (and on its pods)."""
    return {
        JOB_LABEL: job_label(name),
        "app.kubernetes.io/name": "finetune-trainer",
        "app.kubernetes.io/managed-by": "finetune-operator",
    }


def run_config_json(spec: FineTuneJobSpec) -> str:
    """The run config the trainer reads, as JSON (camelCase, unset fields omitted)."""
    return spec.run_config().model_dump_json(by_alias=True, exclude_none=True)


def config_hash(spec: FineTuneJobSpec) -> str:
    """A short digest of the run config (recorded on the Job for humans and audits)."""
    return hashlib.sha256(run_config_json(spec).encode()).hexdigest()[:16]


def build_configmap(name: str, namespace: str, spec: FineTuneJobSpec) -> Manifest:
    """The ConfigMap `<name>-config` with key config.json = the run config."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(name),
            "namespace": namespace,
            "labels": labels(name),
            "annotations": {CONFIG_HASH_ANNOTATION: config_hash(spec)},
        },
        "data": {CONFIG_KEY: run_config_json(spec)},
    }


def pvc_volume_name(claim: str) -> str:
    """A DNS-label volume name for a claim (at most 63 characters)."""
    name = "pvc-" + claim.replace(".", "-")
    if len(name) > 63:
        name = "pvc-" + hashlib.sha256(claim.encode()).hexdigest()[:16]
    return name


def pvc_mounts(spec: FineTuneJobSpec) -> dict[str, bool]:
    """Claim -> read-only, for every pvc:// URI in the spec (the output's claim is writable)."""
    output_claim = pvc_claim(spec.output.uri) if spec.output.uri.startswith("pvc://") else None
    claims: dict[str, bool] = {}
    for _, uri in pvc_uris(spec):
        claim = pvc_claim(uri)
        claims[claim] = claim != output_claim
    return claims


def _resources(spec: FineTuneJobSpec) -> dict[str, dict[str, str]]:
    res = spec.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if res.cpu:
        requests["cpu"] = limits["cpu"] = res.cpu
    if res.memory:
        requests["memory"] = limits["memory"] = res.memory
    if res.gpus > 0:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(res.gpus)
    out: dict[str, dict[str, str]] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def master_address(name: str, namespace: str) -> str:
    """Pod 0's stable DNS name in a several-pod run (Indexed Job hostname + headless Service):
    where every pod's launcher meets (static rendezvous; global rank 0 runs there)."""
    return f"{job_name(name)}-0.{service_name(name)}.{namespace}.svc"


def _group_env(name: str, namespace: str, spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    """torchrun's PET_* variables for the launcher (finetune_trainer.launch), when the run has
    more than one worker; the pod's index comes from the Job controller (JOB_COMPLETION_INDEX)."""
    res = spec.resources
    if res.workers == 1:
        return []
    env = [
        {"name": ENV_NPROC_PER_NODE, "value": str(res.workers_per_pod)},
        {"name": ENV_SHUTDOWN_TIMEOUT, "value": str(SHUTDOWN_TIMEOUT_SECONDS)},
    ]
    if res.nodes > 1:
        env += [
            {"name": ENV_NNODES, "value": str(res.nodes)},
            {"name": ENV_MASTER_ADDR, "value": master_address(name, namespace)},
            {"name": ENV_MASTER_PORT, "value": str(RENDEZVOUS_PORT)},
        ]
    return env


def _secret_env(name: str, ref: SecretKeyRef | None) -> list[dict[str, Any]]:
    """The variable `name` from a key of a Secret (none when `ref` is None)."""
    if ref is None:
        return []
    return [{"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}]


def _env(name: str, namespace: str, spec: FineTuneJobSpec, uid: str | None) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": ENV_CONFIG, "value": CONFIG_PATH},
        {"name": ENV_PROGRESS_PORT, "value": str(PROGRESS_PORT)},
        {"name": ENV_PVC_ROOT, "value": PVC_ROOT},
        {"name": ENV_TERMINATION_PATH, "value": TERMINATION_MESSAGE_PATH},
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": ENV_JOB_NAME, "value": name},
        {"name": ENV_JOB_NAMESPACE, "value": namespace},
    ]
    if uid:
        env.append({"name": ENV_JOB_UID, "value": uid})
    secrets = spec.secrets or SecretsSpec()
    return (
        env
        + _secret_env(ENV_HF_TOKEN, secrets.hf_token)
        + _secret_env(ENV_WANDB_API_KEY, secrets.wandb)
    )


def _with_platform_env(env: list[dict[str, Any]], policy: Policy) -> list[dict[str, Any]]:
    """The trainer's env plus the platform's (`Policy.trainer_env`, e.g. NCCL settings, and
    the cap on a job's estimated GPU-hours); a variable the operator sets keeps its value."""
    if policy.max_gpu_hours_per_job is not None:
        env = [*env, {"name": ENV_MAX_GPU_HOURS, "value": f"{policy.max_gpu_hours_per_job:g}"}]
    taken = {item["name"] for item in env}
    extra = [
        {"name": k, "value": v} for k, v in sorted(policy.trainer_env.items()) if k not in taken
    ]
    return env + extra


def _tolerations(spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    tolerations = [
        t.model_dump(by_alias=True, exclude_none=True) for t in spec.resources.tolerations or []
    ]
    if spec.resources.gpus > 0:
        gpu = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
        if gpu not in tolerations:
            tolerations.append(gpu)
    return tolerations


def build_pod_spec(
    name: str, namespace: str, spec: FineTuneJobSpec, policy: Policy, uid: str | None = None
) -> Manifest:
    """The trainer pod's spec (inside the Job's template); `uid`: the FineTuneJob's (the
    trainer tags its experiment-tracker runs with name, namespace and uid)."""
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": configmap_name(name)}},
        {"name": "tmp", "emptyDir": {}},
        {
            "name": "dshm",
            "emptyDir": {
                "medium": "Memory",
                "sizeLimit": spec.resources.shm_size or DEFAULT_SHM_SIZE,
            },
        },
    ]
    for claim, read_only in pvc_mounts(spec).items():
        volume = pvc_volume_name(claim)
        mounts.append({"name": volume, "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": read_only})
        volumes.append(
            {"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}}
        )

    container: Manifest = {
        "name": CONTAINER_NAME,
        "image": spec.resources.image or policy.default_image,
        "imagePullPolicy": "IfNotPresent",
        "command": list(TRAINER_COMMAND),
        "env": _with_platform_env(
            _env(name, namespace, spec, uid) + _group_env(name, namespace, spec), policy
        ),
        "ports": [{"name": PROGRESS_PORT_NAME, "containerPort": PROGRESS_PORT, "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": {"path": PROGRESS_PATH, "port": PROGRESS_PORT_NAME},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "resources": _resources(spec),
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    secrets = spec.secrets or SecretsSpec()
    env_from = [
        {"secretRef": {"name": ref.name}} for ref in (secrets.storage, secrets.mlflow) if ref
    ]
    if env_from:
        container["envFrom"] = env_from

    pod: Manifest = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    node_selector = dict(spec.resources.node_selector or {})
    if spec.resources.gpu_type:
        node_selector[GPU_PRODUCT_LABEL] = spec.resources.gpu_type
    if node_selector:
        pod["nodeSelector"] = node_selector
    if tolerations := _tolerations(spec):
        pod["tolerations"] = tolerations
    if spec.priority_class_name:
        pod["priorityClassName"] = spec.priority_class_name
    if spec.resources.nodes > 1:
        pod["subdomain"] = service_name(name)  # pods resolve as <Job>-<index>.<Service>
        container["ports"].append(
            {"name": RENDEZVOUS_PORT_NAME, "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"}
        )
    return pod


def build_service(name: str, namespace: str, spec: FineTuneJobSpec) -> Manifest | None:
    """The headless Service of a several-pod run (None for one pod): DNS names for its pods,
    published before they are ready so the launchers can meet while the trainer starts."""
    if spec.resources.nodes == 1:
        return None
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service_name(name), "namespace": namespace, "labels": labels(name)},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {JOB_LABEL: job_label(name)},
            "ports": [{"name": RENDEZVOUS_PORT_NAME, "port": RENDEZVOUS_PORT, "protocol": "TCP"}],
        },
    }


def pod_failure_policy() -> Manifest:
    """Preemption/disruption -> ignore (retry, not counted); invalid input -> fail at once."""
    return {
        "rules": [
            {
                "action": "Ignore",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            },
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": CONTAINER_NAME,
                    "operator": "In",
                    "values": [int(ExitCode.INVALID_INPUT)],
                },
            },
            {
                "action": "Ignore",
                "onExitCodes": {
                    "containerName": CONTAINER_NAME,
                    "operator": "In",
                    "values": [int(ExitCode.PREEMPTED)],
                },
            },
        ]
    }


def build_job(
    name: str, namespace: str, spec: FineTuneJobSpec, policy: Policy, uid: str | None = None
) -> Manifest:
    """The batch/v1 Job that runs the trainer (created suspended for Kueue when queued).

    A run of several pods is an Indexed Job (completions = parallelism = nodes): pod i gets
    JOB_COMPLETION_INDEX=i, which is its node rank. One failure takes the whole group down
    (the others lose a peer), so each pod's failures count: backoffLimit is per pod of the
    group (spec.backoffLimit x nodes), and a failed pod is replaced only once it is gone
    (podReplacementPolicy: Failed), so two pods never share a hostname."""
    nodes = spec.resources.nodes
    job_labels = labels(name)
    if spec.queue_name:
        job_labels[KUEUE_QUEUE_LABEL] = spec.queue_name
    job_spec: Manifest = {
        "backoffLimit": spec.backoff_limit * nodes,
        "completions": nodes,
        "parallelism": nodes,
        "suspend": spec.suspend or spec.queue_name is not None,
        "podFailurePolicy": pod_failure_policy(),
        "template": {
            "metadata": {"labels": labels(name)},
            "spec": build_pod_spec(name, namespace, spec, policy, uid),
        },
    }
    if nodes > 1:
        job_spec["completionMode"] = "Indexed"
        job_spec["podReplacementPolicy"] = "Failed"
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(name),
            "namespace": namespace,
            "labels": job_labels,
            "annotations": {CONFIG_HASH_ANNOTATION: config_hash(spec)},
        },
        "spec": job_spec,
    }
