"""The Kubernetes permissions the operator needs: the chart's RBAC is tested against this.

Keep it exact: every API call the operator (kopf included) makes must be covered here, and
nothing more. No wildcards.
"""

from __future__ import annotations

from typing import TypedDict

from finetune_operator.api import GROUP, PLURAL


class PolicyRule(TypedDict):
    """One rbac.authorization.k8s.io/v1 PolicyRule."""

    apiGroups: list[str]
    resources: list[str]
    verbs: list[str]


# Rules the operator needs in every namespace it watches.
NAMESPACED_RULES: list[PolicyRule] = [
    {
        "apiGroups": [GROUP],
        "resources": [PLURAL],
        "verbs": ["get", "list", "watch", "patch", "delete"],
    },
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["get", "patch"]},
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/finalizers"], "verbs": ["update"]},
    # Jobs and pods: kopf's label-selected watches; Jobs are created, read back on a 409 and
    # patched (spec.suspend); deletion is left to the garbage collector.
    {
        "apiGroups": ["batch"],
        "resources": ["jobs"],
        "verbs": ["get", "list", "watch", "create", "patch"],
    },
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    # ConfigMaps: created, and read back on a 409 (never listed: no cluster-wide ConfigMap reads)
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create"]},
    # Services: the headless Service of a several-pod run, created and read back on a 409
    {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "create"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
]

# Cluster-scoped rules (kopf discovers the CRD at start-up).
CLUSTER_RULES: list[PolicyRule] = [
    {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": ["get", "list", "watch"],
    },
]
