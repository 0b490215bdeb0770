"""Pure builders: spec -> ConfigMap and Job manifests, compared as whole dicts."""

from __future__ import annotations

import json
from typing import Any

import pytest
from finetune_operator.api import parse_spec
from finetune_operator.builders import (
    build_configmap,
    build_job,
    build_pod_spec,
    build_service,
    config_hash,
    pvc_volume_name,
)
from finetune_operator.policy import Policy, check_policy

POLICY = Policy(default_image="registry.local/trainer:1")
BASE: dict[str, Any] = {
    "model": {"source": "hf://Qwen/Qwen2.5-0.5B"},
    "dataset": {"source": "s3://bucket/train.jsonl"},
    "output": {"uri": "s3://bucket/out"},
}
LABELS = {
    "finetune.dev/job": "ft",
    "app.kubernetes.io/name": "finetune-trainer",
    "app.kubernetes.io/managed-by": "finetune-operator",
}
SECURITY = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}
ENV = [
    {"name": "FINETUNE_CONFIG", "value": "/etc/finetune/config.json"},
    {"name": "FINETUNE_PROGRESS_PORT", "value": "8080"},
    {"name": "FINETUNE_PVC_ROOT", "value": "/mnt/pvc"},
    {"name": "FINETUNE_TERMINATION_MESSAGE_PATH", "value": "/dev/termination-log"},
    {"name": "HOME", "value": "/tmp"},
    {"name": "HF_HOME", "value": "/tmp/hf"},
    {"name": "PYTHONUNBUFFERED", "value": "1"},
    {"name": "FINETUNE_JOB_NAME", "value": "ft"},
    {"name": "FINETUNE_JOB_NAMESPACE", "value": "ns"},
]
BASE_MOUNTS = [
    {"name": "config", "mountPath": "/etc/finetune", "readOnly": True},
    {"name": "tmp", "mountPath": "/tmp"},
    {"name": "dshm", "mountPath": "/dev/shm"},
]
BASE_VOLUMES = [
    {"name": "config", "configMap": {"name": "ft-config"}},
    {"name": "tmp", "emptyDir": {}},
    {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
]
FAILURE_POLICY = {
    "rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {
            "action": "FailJob",
            "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [65]},
        },
        {
            "action": "Ignore",
            "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [75]},
        },
    ]
}


def make(**extra: Any) -> Any:
    return parse_spec({**BASE, **extra})


def expected_job(
    spec: Any,
    *,
    container: dict[str, Any],
    pod: dict[str, Any],
    job: dict[str, Any],
    job_labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    base_container = {
        "name": "trainer",
        "image": "registry.local/trainer:1",
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "finetune_trainer"],
        "env": ENV,
        "ports": [{"name": "progress", "containerPort": 8080, "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": {"path": "/progress", "port": "progress"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "resources": {},
        "volumeMounts": BASE_MOUNTS,
        "securityContext": SECURITY,
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    base_pod = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 300,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [{**base_container, **container}],
        "volumes": BASE_VOLUMES,
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": "ft",
            "namespace": "ns",
            "labels": job_labels or LABELS,
            "annotations": {"finetune.dev/config-hash": config_hash(spec)},
        },
        "spec": {
            "backoffLimit": 3,
            "completions": 1,
            "parallelism": 1,
            "suspend": False,
            "podFailurePolicy": FAILURE_POLICY,
            "template": {"metadata": {"labels": LABELS}, "spec": {**base_pod, **pod}},
            **job,
        },
    }


def test_configmap_holds_the_run_config_only() -> None:
    spec = make(resources={"gpus": 2}, suspend=True)
    cm = build_configmap("ft", "ns", spec)
    config = json.loads(cm["data"]["config.json"])
    assert cm == {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "ft-config",
            "namespace": "ns",
            "labels": LABELS,
            "annotations": {"finetune.dev/config-hash": config_hash(spec)},
        },
        "data": {
            "config.json": spec.run_config().model_dump_json(by_alias=True, exclude_none=True)
        },
    }
    assert "resources" not in config and "suspend" not in config
    assert config["model"]["source"] == "hf://Qwen/Qwen2.5-0.5B"


def test_gpu_job() -> None:
    spec = make(
        resources={
            "gpus": 2,
            "gpuType": "NVIDIA-H100-80GB-HBM3",
            "cpu": "8",
            "memory": "64Gi",
            "nodeSelector": {"pool": "gpu"},
            "shmSize": "16Gi",
            "tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
            ],
        },
        priorityClassName="training",
        activeDeadlineSeconds=7200,
        backoffLimit=5,
    )
    volumes = [
        *BASE_VOLUMES[:2],
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}},
    ]
    assert build_job("ft", "ns", spec, POLICY) == expected_job(
        spec,
        container={
            "env": [
                *ENV,  # two GPUs: the launcher starts one worker per GPU
                {"name": "PET_NPROC_PER_NODE", "value": "2"},
                {"name": "FINETUNE_SHUTDOWN_TIMEOUT_SECONDS", "value": "270"},
            ],
            "resources": {
                "requests": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "2"},
                "limits": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "2"},
            },
        },
        pod={
            "volumes": volumes,
            "nodeSelector": {"pool": "gpu", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            ],
            "priorityClassName": "training",
        },
        job={"backoffLimit": 5, "activeDeadlineSeconds": 7200},
    )


def test_a_run_of_several_pods_is_an_indexed_job_behind_a_headless_service() -> None:
    spec = make(resources={"gpus": 8, "nodes": 2}, backoffLimit=2)
    gpus = {"nvidia.com/gpu": "8"}
    assert build_job("ft", "ns", spec, POLICY) == expected_job(
        spec,
        container={
            "env": [
                *ENV,
                {"name": "PET_NPROC_PER_NODE", "value": "8"},
                {"name": "FINETUNE_SHUTDOWN_TIMEOUT_SECONDS", "value": "270"},
                {"name": "PET_NNODES", "value": "2"},
                {"name": "PET_MASTER_ADDR", "value": "ft-0.ftj-ft.ns.svc"},
                {"name": "PET_MASTER_PORT", "value": "29500"},
            ],
            "ports": [
                {"name": "progress", "containerPort": 8080, "protocol": "TCP"},
                {"name": "rendezvous", "containerPort": 29500, "protocol": "TCP"},
            ],
            "resources": {"requests": gpus, "limits": gpus},
        },
        pod={
            "subdomain": "ftj-ft",
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
        },
        job={
            "backoffLimit": 4,  # per pod of the group: one failure takes every pod down
            "completions": 2,
            "parallelism": 2,
            "completionMode": "Indexed",
            "podReplacementPolicy": "Failed",
        },
    )
    assert build_service("ft", "ns", spec) == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "ftj-ft", "namespace": "ns", "labels": LABELS},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"finetune.dev/job": "ft"},
            "ports": [{"name": "rendezvous", "port": 29500, "protocol": "TCP"}],
        },
    }
    assert build_service("ft", "ns", make(resources={"gpus": 8})) is None


def test_cpu_job_has_no_gpu_resources_or_toleration() -> None:
    spec = make(resources={"gpus": 0, "image": "my/trainer:dev"})
    job = build_job("ft", "ns", spec, POLICY)
    assert job == expected_job(spec, container={"image": "my/trainer:dev"}, pod={}, job={})


def test_pvc_sources_are_mounted_read_only_and_output_writable() -> None:
    spec = make(
        model={"source": "pvc://models/llama"},
        dataset={
            "source": "pvc://data/train.jsonl",
            "validation": {"source": "pvc://data/val.jsonl"},
            "test": {"source": "pvc://eval.sets/test.jsonl"},
        },
        output={"uri": "pvc://outputs/run1"},
        resources={"gpus": 0},
    )
    job = build_job("ft", "ns", spec, POLICY)
    mounts = [
        *BASE_MOUNTS,
        {"name": "pvc-models", "mountPath": "/mnt/pvc/models", "readOnly": True},
        {"name": "pvc-data", "mountPath": "/mnt/pvc/data", "readOnly": True},
        {"name": "pvc-eval-sets", "mountPath": "/mnt/pvc/eval.sets", "readOnly": True},
        {"name": "pvc-outputs", "mountPath": "/mnt/pvc/outputs", "readOnly": False},
    ]
    volumes = [
        *BASE_VOLUMES,
        {"name": "pvc-models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
        {"name": "pvc-data", "persistentVolumeClaim": {"claimName": "data", "readOnly": True}},
        {
            "name": "pvc-eval-sets",
            "persistentVolumeClaim": {"claimName": "eval.sets", "readOnly": True},
        },
        {
            "name": "pvc-outputs",
            "persistentVolumeClaim": {"claimName": "outputs", "readOnly": False},
        },
    ]
    assert job == expected_job(
        spec, container={"volumeMounts": mounts}, pod={"volumes": volumes}, job={}
    )


def test_output_claim_also_used_as_input_is_writable() -> None:
    spec = make(
        model={"source": "pvc://work/base"}, output={"uri": "pvc://work/out"}, resources={"gpus": 0}
    )
    pod = build_job("ft", "ns", spec, POLICY)["spec"]["template"]["spec"]
    assert pod["volumes"][-1] == {
        "name": "pvc-work",
        "persistentVolumeClaim": {"claimName": "work", "readOnly": False},
    }


def test_long_claim_names_get_a_short_volume_name() -> None:
    name = pvc_volume_name("a" * 100)
    assert len(name) <= 63 and name.startswith("pvc-")


def test_secrets_are_referenced_never_inlined() -> None:
    spec = make(
        secrets={"hfToken": {"name": "hf", "key": "token"}, "storage": {"name": "s3-creds"}},
        resources={"gpus": 0},
    )
    job = build_job("ft", "ns", spec, POLICY)
    assert job == expected_job(
        spec,
        container={
            "env": [
                *ENV,
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
            ],
            "envFrom": [{"secretRef": {"name": "s3-creds"}}],
        },
        pod={},
        job={},
    )


def test_tracker_credentials_reach_the_trainer_as_env_only_with_the_jobs_identity() -> None:
    spec = make(
        tracking={
            "mlflow": {"trackingUri": "http://mlflow.mlflow.svc:5000", "experiment": "e"},
            "wandb": {"project": "p"},
            "tensorboard": True,
        },
        secrets={
            "storage": {"name": "s3-creds"},
            "mlflow": {"name": "mlflow-auth"},
            "wandb": {"name": "wandb", "key": "apiKey"},
        },
        resources={"gpus": 0},
    )
    job = build_job("ft", "ns", spec, POLICY, uid="6c1d-uid")
    assert job == expected_job(
        spec,
        container={
            "env": [
                *ENV,
                {"name": "FINETUNE_JOB_UID", "value": "6c1d-uid"},
                {
                    "name": "WANDB_API_KEY",
                    "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "apiKey"}},
                },
            ],
            "envFrom": [
                {"secretRef": {"name": "s3-creds"}},
                {"secretRef": {"name": "mlflow-auth"}},
            ],
        },
        pod={},
        job={},
    )
    # the run config the trainer reads names the trackers, never a credential
    config = build_configmap("ft", "ns", spec)["data"]["config.json"]
    assert '"mlflow"' in config and "mlflow-auth" not in config and "apiKey" not in config


def test_kueue_job_is_created_suspended_with_queue_label() -> None:
    spec = make(queueName="team-a", resources={"gpus": 0})
    assert build_job("ft", "ns", spec, POLICY) == expected_job(
        spec,
        container={},
        pod={},
        job={"suspend": True},
        job_labels={**LABELS, "kueue.x-k8s.io/queue-name": "team-a"},
    )


def test_suspend_from_spec() -> None:
    spec = make(suspend=True, resources={"gpus": 0})
    assert build_job("ft", "ns", spec, POLICY)["spec"]["suspend"] is True


@pytest.mark.parametrize(
    ("extra", "namespace", "policy", "expected"),
    [
        ({}, "ns", Policy(), []),
        (
            {"resources": {"gpus": 9}},
            "ns",
            Policy(),
            ["spec.resources.gpus: 9 GPUs exceeds the platform maximum of 8 per job"],
        ),
        (
            {"model": {"source": "hf://x/y", "trustRemoteCode": True}},
            "ns",
            Policy(),
            [
                "spec.model.trustRemoteCode: running code shipped with a model is disabled by the "
                "platform policy (ask your platform team to set allowTrustRemoteCode)"
            ],
        ),
        (
            {"model": {"source": "hf://x/y", "trustRemoteCode": True}},
            "ns",
            Policy(allow_trust_remote_code=True),
            [],
        ),
        (
            {},
            "dev",
            Policy(allowed_namespaces=("ml", "research")),
            [
                "metadata.namespace: namespace 'dev' may not run FineTuneJobs (platform policy "
                "allows: ml, research)"
            ],
        ),
        (
            {"output": {"uri": "pvc://Bad_Claim/x"}},
            "ns",
            Policy(),
            [
                "spec.output.uri: 'pvc://Bad_Claim/x' does not name a valid PersistentVolumeClaim "
                "(pvc://CLAIM/path, CLAIM a lowercase DNS name)"
            ],
        ),
    ],
)
def test_policy(extra: dict[str, Any], namespace: str, policy: Policy, expected: list[str]) -> None:
    assert check_policy(make(**extra), namespace, policy) == expected


def test_policy_from_env() -> None:
    policy = Policy.from_env(
        {
            "FINETUNE_DEFAULT_IMAGE": "r/t:2",
            "FINETUNE_ALLOW_TRUST_REMOTE_CODE": "true",
            "FINETUNE_MAX_GPUS_PER_JOB": "4",
            "FINETUNE_ALLOWED_NAMESPACES": "a, b,",
            "FINETUNE_POLL_INTERVAL_SECONDS": "2.5",
            "FINETUNE_TRAINER_ENV": '{"NCCL_SOCKET_IFNAME": "eth0"}',
            "FINETUNE_MAX_GPU_HOURS_PER_JOB": "24",
        }
    )
    assert policy == Policy(
        max_gpu_hours_per_job=24.0,
        default_image="r/t:2",
        allow_trust_remote_code=True,
        max_gpus_per_job=4,
        allowed_namespaces=("a", "b"),
        poll_interval_seconds=2.5,
        trainer_env={"NCCL_SOCKET_IFNAME": "eth0"},
    )
    assert Policy.from_env({}) == Policy()
    with pytest.raises(ValueError, match="not environment variable names: \\['NCCL-X'\\]"):
        Policy.from_env({"FINETUNE_TRAINER_ENV": '{"NCCL-X": "1"}'})


def test_the_platforms_trainer_env_reaches_every_trainer_but_not_over_the_contract() -> None:
    policy = Policy(trainer_env={"NCCL_IB_HCA": "mlx5_0,mlx5_1", "HOME": "/root"})
    pod = build_pod_spec("ft", "ns", make(resources={"gpus": 8, "nodes": 2}), policy)
    env = pod["containers"][0]["env"]
    assert {"name": "NCCL_IB_HCA", "value": "mlx5_0,mlx5_1"} in env
    assert [e["value"] for e in env if e["name"] == "HOME"] == ["/tmp"]  # the contract's


def test_the_gpu_hours_cap_reaches_the_trainer_only_when_set() -> None:
    capped = build_pod_spec("ft", "ns", make(), Policy(max_gpu_hours_per_job=24.0))
    assert {"name": "FINETUNE_MAX_GPU_HOURS", "value": "24"} in capped["containers"][0]["env"]
    free = build_pod_spec("ft", "ns", make(), Policy())
    assert all(e["name"] != "FINETUNE_MAX_GPU_HOURS" for e in free["containers"][0]["env"])


def test_kueue_admits_a_group_as_one_suspended_indexed_job() -> None:
    """Kueue's batch/Job integration admits the Job as one workload of `parallelism` pods:
    all of the group's pods, or none."""
    job = build_job("ft", "ns", make(resources={"gpus": 8, "nodes": 4}, queueName="team-a"), POLICY)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["suspend"] is True
    assert (job["spec"]["parallelism"], job["spec"]["completions"]) == (4, 4)
    assert job["spec"]["completionMode"] == "Indexed"
