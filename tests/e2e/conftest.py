"""Fixtures for the opt-in end-to-end suite (`--e2e`): a real cluster from KUBECONFIG.

No emulator and no mocks: the CRD is installed on the cluster, the real operator runs as a
subprocess restricted to a fresh namespace, and the cluster's own controllers (Job, garbage
collector) do the rest. Without `--e2e` these tests are skipped by tests/conftest.py; with it,
they skip when no kubeconfig exists or the API server does not answer /version.
"""

from __future__ import annotations

import secrets
from collections.abc import Generator, Iterator

import pytest
from e2e_kube import (
    FIELD_MANAGER,
    Cluster,
    ClusterUnavailableError,
    Obj,
    Operator,
    condition,
    kubeconfig_problem,
    load_crd_manifest,
    quickstart_body,
    start_operator,
    wait_for,
)
from finetune_operator.names import job_name
from kubernetes_asyncio.client.exceptions import ApiException

_RUNNING: list[Operator] = []  # the operator of the current module, for failure reports


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the operator log's tail to every failed e2e test (setup, call or teardown)."""
    report = yield
    if report.failed and _RUNNING:
        report.sections.append(("operator log (tail)", _RUNNING[-1].tail()))
    return report


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The cluster of the current kubeconfig context; skip when none is configured/reachable."""
    problem = kubeconfig_problem()
    if problem is not None:
        pytest.skip(problem)
    try:
        connected = Cluster.connect()
    except ClusterUnavailableError as exc:
        pytest.skip(f"no reachable cluster: {exc}")
    yield connected
    connected.close()


@pytest.fixture(scope="module")
def crd(cluster: Cluster) -> Obj:
    """The FineTuneJob CRD from crds/, created or replaced, and Established."""
    manifest = load_crd_manifest()
    name = manifest["metadata"]["name"]
    cluster.install_crd(manifest)

    def established() -> bool:
        return any(
            c.get("type") == "Established" and c.get("status") == "True"
            for c in ((cluster.crd(name) or {}).get("status") or {}).get("conditions") or []
        )

    wait_for(established, f"CRD {name} to be Established", timeout=60)

    def served() -> bool:  # discovery can trail the Established condition by a moment
        try:
            cluster.ftjs("default")
        except ApiException:
            return False
        return True

    wait_for(served, f"the {name} API to be served", timeout=30)
    return manifest


@pytest.fixture(scope="module")
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace (restricted Pod Security), deleted at the end."""
    name = f"ftj-e2e-{secrets.token_hex(4)}"
    cluster.create_namespace(
        name,
        {
            "app.kubernetes.io/created-by": FIELD_MANAGER,
            "pod-security.kubernetes.io/enforce": "restricted",
        },
    )
    try:
        # pods are refused until the namespace's default ServiceAccount exists
        wait_for(
            lambda: cluster.service_account(name, "default"),
            f"the default ServiceAccount of namespace {name}",
            timeout=30,
        )
        yield name
    finally:
        cluster.delete_namespace(name)  # FineTuneJobs carry no finalizer: nothing blocks it


@pytest.fixture(scope="module")
def operator(
    cluster: Cluster, crd: Obj, namespace: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    """`python -m finetune_operator.main` watching only `namespace`, healthy on /healthz."""
    running = start_operator(namespace, tmp_path_factory.mktemp("operator"))
    _RUNNING.append(running)
    try:
        yield running
    finally:
        running.stop()
        _RUNNING.remove(running)


@pytest.fixture(scope="module")
def quickstart(cluster: Cluster, operator: Operator, namespace: str) -> Obj:
    """examples/quickstart.yaml applied in `namespace`, once its Job exists."""
    created = cluster.create_ftj(namespace, quickstart_body(namespace))
    name = created["metadata"]["name"]
    wait_for(
        lambda: cluster.job(namespace, job_name(name)),
        f"the operator to create Job {job_name(name)}",
        timeout=60,
        detail=lambda: (cluster.ftj(namespace, name) or {}).get("status"),
    )
    wait_for(
        lambda: condition(cluster.ftj(namespace, name), "Created"),
        f"FineTuneJob {name} to get a Created condition",
        timeout=60,
        detail=lambda: (cluster.ftj(namespace, name) or {}).get("status"),
    )
    return created
