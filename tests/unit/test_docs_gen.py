"""docs/api-reference.md is generated from the API models and must be current."""

from __future__ import annotations

from finetune_operator import docs_gen
from finetune_operator.api import FineTuneJobSpec, FineTuneJobStatus


def test_committed_api_reference_is_current() -> None:
    assert docs_gen.OUTPUT.read_text() == docs_gen.render(), (
        "docs/api-reference.md is stale: run `python -m finetune_operator.docs_gen`"
    )
    assert docs_gen.main(["--check"]) == 0


def test_every_field_is_documented() -> None:
    text = docs_gen.render()
    for model in (FineTuneJobSpec, FineTuneJobStatus):
        for name, field in model.model_fields.items():
            assert f"| `{field.alias or name}` |" in text, name
    for nested in ("lora", "quantization", "targetModules", "splitRatio", "hfToken", "etaSeconds"):
        assert f"| `{nested}` |" in text, nested
