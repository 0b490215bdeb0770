"""URI fields are found from the model types: mounted and policy-checked wherever they are."""

from __future__ import annotations

from typing import Any

from finetune_operator.api import FineTuneJobSpec, parse_spec
from finetune_operator.builders import pvc_mounts
from finetune_operator.policy import Policy, check_policy, pvc_uris
from finetune_operator.uris import is_uri_field, uri_paths, uri_values
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

KNOWN = [
    "spec.model.source",
    "spec.dataset.source",
    "spec.dataset.mix[].source",
    "spec.dataset.validation.source",
    "spec.dataset.test.source",
    "spec.output.uri",
]
URI_WORDS = ("uri", "url", "source", "location", "path")
# addresses of services the trainer talks to, not storage it mounts or reads
SERVICE_ADDRESSES = {"MlflowSpec.tracking_uri"}


def _models(model: type[BaseModel], seen: set[type[BaseModel]]) -> set[type[BaseModel]]:
    """Every model type reachable from `model`."""
    from finetune_operator.uris import _models_in

    seen.add(model)
    for field in model.model_fields.values():
        for inner, _ in _models_in(field.annotation):
            if inner not in seen:
                _models(inner, seen)
    return seen


def test_every_known_uri_field_is_found() -> None:
    assert set(KNOWN) <= set(uri_paths(FineTuneJobSpec))


def test_a_field_that_names_a_location_is_typed_uri() -> None:
    """Fails when a field that holds a location is added as a plain `str` instead of `Uri`:
    such a field would be neither mounted nor policy-checked."""
    untyped = []
    for model in _models(FineTuneJobSpec, set()):
        for name, field in model.model_fields.items():
            words = f"{name} {field.description or ''}".lower()
            names_location = any(w in name.lower() for w in URI_WORDS) or "uri" in words.split()
            holds_text = "str" in str(field.annotation)
            where = f"{model.__name__}.{name}"
            if names_location and holds_text and not is_uri_field(field):
                untyped.append(where)
    untyped = [where for where in untyped if where not in SERVICE_ADDRESSES]
    assert untyped == [], f"type these fields as finetune_trainer.config.Uri: {untyped}"


def test_uri_values_name_the_field_of_each_uri() -> None:
    spec = parse_spec(
        {
            "model": {"source": "pvc://models/base"},
            "dataset": {
                "source": "s3://b/train.jsonl",
                "mix": [
                    {"source": "pvc://general/a.jsonl", "fraction": 0.1},
                    {"source": "hf://datasets/x", "fraction": 0.2},
                ],
                "validation": {"source": "pvc://data/val.jsonl"},
            },
            "output": {"uri": "pvc://out/run"},
        }
    )
    assert uri_values(spec) == [
        ("spec.model.source", "pvc://models/base"),
        ("spec.dataset.source", "s3://b/train.jsonl"),
        ("spec.dataset.mix[0].source", "pvc://general/a.jsonl"),
        ("spec.dataset.mix[1].source", "hf://datasets/x"),
        ("spec.dataset.validation.source", "pvc://data/val.jsonl"),
        ("spec.output.uri", "pvc://out/run"),
    ]


claim = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)
bad_claim = st.sampled_from(["Bad_Claim", "UPPER", "under_score", "-dash"])


def _spec_with(claims: dict[str, str]) -> dict[str, Any]:
    return {
        "model": {"source": f"pvc://{claims['model']}/base"},
        "dataset": {
            "source": f"pvc://{claims['data']}/train.jsonl",
            "mix": [{"source": f"pvc://{claims['mix']}/general.jsonl", "fraction": 0.1}],
            "validation": {"source": f"pvc://{claims['val']}/val.jsonl"},
            "test": {"source": f"pvc://{claims['test']}/test.jsonl"},
        },
        "output": {"uri": f"pvc://{claims['out']}/run"},
    }


FIELDS = ("model", "data", "mix", "val", "test", "out")


@given(st.fixed_dictionaries({k: claim for k in FIELDS}))
def test_every_claim_is_mounted_and_only_the_output_is_writable(claims: dict[str, str]) -> None:
    spec = parse_spec(_spec_with(claims))
    mounts = pvc_mounts(spec)
    assert set(mounts) == set(claims.values())
    assert {c for c, read_only in mounts.items() if not read_only} == {claims["out"]}
    assert [path for path, _ in pvc_uris(spec)] == [
        "spec.model.source",
        "spec.dataset.source",
        "spec.dataset.mix[0].source",
        "spec.dataset.validation.source",
        "spec.dataset.test.source",
        "spec.output.uri",
    ]


@given(st.sampled_from(FIELDS), bad_claim)
def test_an_invalid_claim_is_refused_wherever_it_is(where: str, bad: str) -> None:
    claims = dict.fromkeys(FIELDS, "ok")
    claims[where] = bad
    errors = check_policy(parse_spec(_spec_with(claims)), "ns", Policy())
    path = {
        "model": "spec.model.source",
        "data": "spec.dataset.source",
        "mix": "spec.dataset.mix[0].source",
        "val": "spec.dataset.validation.source",
        "test": "spec.dataset.test.source",
        "out": "spec.output.uri",
    }[where]
    assert len(errors) == 1 and errors[0].startswith(f"{path}: 'pvc://{bad}/")
