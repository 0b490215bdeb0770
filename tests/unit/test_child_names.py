"""Every FineTuneJob name the API server accepts yields children it accepts too (property tests).

The rules are the API server's own (tests/integration/apiserver_rules.py: apimachinery's name and
label validation, and the labels the API server adds to a Job's pod template) plus the OpenAPI
schemas of kubernetes-validate; kmock would accept anything.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
from finetune_operator.api import parse_spec
from finetune_operator.builders import JOB_LABEL, build_configmap, build_job, build_service
from finetune_operator.names import (
    bounded_name,
    configmap_name,
    job_label,
    job_name,
    service_name,
)
from finetune_operator.policy import Policy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

RULES_FILE = Path(__file__).resolve().parents[1] / "integration" / "apiserver_rules.py"
K8S_VERSION = kubernetes_validate.latest_version()


def _load_rules() -> Any:
    spec = importlib.util.spec_from_file_location("apiserver_rules", RULES_FILE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rules = _load_rules()

# one DNS-1123 label: [a-z0-9], then [-a-z0-9]*, ending in [a-z0-9]
_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
dns_label = st.builds(
    lambda first, middle, last: first + middle + last if middle or last else first,
    st.sampled_from(_ALNUM),
    st.text(alphabet=_ALNUM + "-", max_size=61),
    st.text(alphabet=_ALNUM, max_size=1),
).filter(lambda s: not s.endswith("-"))
dns_subdomain = (
    st.lists(dns_label, min_size=1, max_size=8).map(".".join).filter(lambda s: len(s) <= 253)
)
# long names are the interesting ones: make sure they are generated often
long_subdomain = st.integers(64, 253).flatmap(
    lambda n: (
        st.lists(dns_label, min_size=5, max_size=12)
        .map(".".join)
        .map(lambda s: (s * (n // len(s) + 1))[:n].rstrip(".-"))
        .filter(lambda s: bool(rules.DNS1123_SUBDOMAIN.match(s)))
    )
)
any_name = st.one_of(dns_subdomain, long_subdomain)


def _spec(claims: list[str]) -> Any:
    model, data, mix, out = (claims * 4)[:4]
    return parse_spec(
        {
            "model": {"source": f"pvc://{model}/base"},
            "dataset": {
                "source": f"pvc://{data}/train.jsonl",
                "mix": [{"source": f"pvc://{mix}/general.jsonl", "fraction": 0.1}],
            },
            "output": {"uri": f"pvc://{out}/run"},
            "resources": {"gpus": 8, "nodes": 64, "nodeSelector": {"pool": "a100"}},
            "queueName": "team-a",
        }
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=any_name, claims=st.lists(any_name, min_size=1, max_size=4))
def test_children_of_any_valid_name_pass_the_api_servers_rules(
    name: str, claims: list[str]
) -> None:
    assert rules.problems({"kind": "FineTuneJob", "metadata": {"name": name}}) == []
    spec = _spec(claims)
    service = build_service(name, "ns", spec)
    assert service is not None
    job = build_job(name, "ns", spec, Policy())
    for child in (build_configmap(name, "ns", spec), service, job):
        assert rules.problems(child) == [], child["metadata"]["name"]
        kubernetes_validate.validate(child, K8S_VERSION, strict=True)
    assert job["metadata"]["labels"][JOB_LABEL] == job["metadata"]["name"] == job_name(name)
    # the Job controller names pod i of an Indexed Job <Job>-<i>: a DNS label too
    last_pod = f"{job['metadata']['name']}-{spec.resources.nodes - 1}"
    assert len(last_pod) <= 63 and rules.DNS1123_LABEL.match(last_pod), last_pod
    # the Service is a DNS-1035 label: a letter first, no dots
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", service_name(name)), service_name(name)
    assert len(service_name(name)) <= 63


@given(name=any_name)
def test_names_are_deterministic_and_short_names_unchanged(name: str) -> None:
    assert job_name(name) == job_name(name) and configmap_name(name) == configmap_name(name)
    assert len(job_name(name)) <= 60 and len(configmap_name(name)) <= 253
    assert job_label(name) == job_name(name)
    if len(name) <= 60 and "." not in name:
        assert job_name(name) == name
    if len(name) <= 246:
        assert configmap_name(name) == f"{name}-config"


@given(a=any_name, b=any_name)
def test_different_names_get_different_children(a: str, b: str) -> None:
    if a != b:
        assert job_name(a) != job_name(b)
        assert configmap_name(a) != configmap_name(b)
        assert service_name(a) != service_name(b)


def test_a_shortened_name_keeps_a_readable_prefix_and_a_hash() -> None:
    name = "support-bot-" + "x" * 100
    short = job_name(name)
    assert len(short) == 60
    assert re.fullmatch(r"support-bot-x{39}-[0-9a-f]{8}", short), short
    # the prefix never ends in '-' or '.', whatever the cut hits
    assert bounded_name("a" * 53 + "-.b" * 10, 63).split("-")[-2] == "a" * 53


def test_an_unshortened_long_job_name_is_refused() -> None:
    """The control: the rules do refuse what the operator used to create."""
    job = build_job("x" * 100, "ns", _spec(["data"]), Policy())
    job["metadata"]["name"] = "x" * 100
    assert any("spec.template.metadata.labels" in p and "63" in p for p in rules.problems(job))
