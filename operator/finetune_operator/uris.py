"""Every URI in a spec, found from the model types: a field is a URI when it is typed `Uri`.

`finetune_trainer.config.Uri` is the one type of every location the trainer reads or writes
(model, dataset, splits, mixed-in sources, output). Walking the pydantic models for it, instead
of listing the fields by hand, means a new `Uri` field is mounted (pvc://) and policy-checked
without anyone remembering to add it here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, get_args, get_origin

from finetune_trainer.config import Uri
from pydantic import AfterValidator, BaseModel
from pydantic.fields import FieldInfo

# The validators that make a `str` a `Uri` (pydantic keeps them in a field's metadata).
_URI_CHECKS = tuple(m.func for m in get_args(Uri)[1:] if isinstance(m, AfterValidator))


def _is_uri_marker(item: object) -> bool:
    return isinstance(item, AfterValidator) and item.func in _URI_CHECKS


def _mentions_uri(annotation: Any) -> bool:
    """Whether a type is `Uri`, or `Uri | None`, `list[Uri]`, ... (Annotated anywhere inside)."""
    if get_origin(annotation) is Annotated:
        base, *metadata = get_args(annotation)
        return any(_is_uri_marker(m) for m in metadata) or _mentions_uri(base)
    return any(_mentions_uri(arg) for arg in get_args(annotation))


def is_uri_field(field: FieldInfo) -> bool:
    """Whether a pydantic field holds a URI (typed `Uri`, possibly optional or in a list)."""
    return any(_is_uri_marker(m) for m in field.metadata) or _mentions_uri(field.annotation)


def _models_in(annotation: Any) -> Iterator[tuple[type[BaseModel], str]]:
    """The model types inside a field type, with '[]' for each list/dict level around them."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation, ""
        return
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is dict:
        args = args[1:]  # the values; keys are strings
    nested = "[]" if origin in (list, tuple, set, frozenset, dict) else ""
    for arg in args:
        for model, suffix in _models_in(arg):
            yield model, nested + suffix


def uri_paths(model: type[BaseModel], prefix: str = "spec") -> list[str]:
    """The wire paths of every URI field a model can hold, e.g. `spec.dataset.mix[].source`."""
    paths: list[str] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}.{field.alias or name}"
        if is_uri_field(field):
            paths.append(path)
            continue
        for inner, suffix in _models_in(field.annotation):
            paths.extend(uri_paths(inner, path + suffix))
    return paths


def _values(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _values(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _values(item, f"{path}[{key}]")
    else:
        yield path, value


def uri_values(obj: BaseModel, prefix: str = "spec") -> list[tuple[str, str]]:
    """(wire path, URI) of every URI set in a model instance, e.g. ('spec.dataset.mix[1].source',
    'pvc://general/mix.jsonl'), in field order."""
    found: list[tuple[str, str]] = []
    for name, field in type(obj).model_fields.items():
        path = f"{prefix}.{field.alias or name}"
        for where, value in _values(getattr(obj, name), path):
            if isinstance(value, BaseModel):
                found.extend(uri_values(value, where))
            elif isinstance(value, str) and is_uri_field(field):
                found.append((where, value))
    return found


__all__ = ["is_uri_field", "uri_paths", "uri_values"]
