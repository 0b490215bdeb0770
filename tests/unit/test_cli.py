"""The `finetune` console script: run, validate, help, and the plugged-in cluster commands."""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import Result
from fake_servers import FakeServer
from finetune_trainer.cli import app
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(autouse=True)
def _logger_levels() -> Iterator[None]:
    """The CLI sets our loggers' levels for its process; keep them from leaking across tests."""
    loggers = [logging.getLogger(n) for n in ("finetune_trainer", "finetune_trainer.models")]
    levels = [logger.level for logger in loggers]
    yield
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


def _job(tmp_path: Path, model_dir: Path, data: Path, **spec: object) -> Path:
    doc = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    doc["spec"]["model"]["source"] = str(model_dir)
    doc["spec"]["dataset"]["source"] = str(data)
    doc["spec"].update(spec)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def console_script() -> Path:
    """The `finetune` console script of the interpreter running the tests (found beside it,
    not on PATH: `.venv/bin/python -m pytest` works without activating the venv)."""
    exe = Path(sys.executable).parent / "finetune"
    assert exe.exists(), "the finetune console script is installed by scripts/setup.sh"
    return exe


def without_venv_on_path() -> dict[str, str]:
    """The environment with the interpreter's bin directory removed from PATH."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != bin_dir)
    return {**os.environ, "PATH": path}


def test_console_script_help_lists_local_and_cluster_commands() -> None:
    env = without_venv_on_path()
    assert shutil.which("finetune", path=env["PATH"]) != str(console_script())
    out = subprocess.run(
        [console_script(), "--help"], capture_output=True, text=True, check=True, env=env
    ).stdout
    for command in ("run", "validate", "status", "list", "logs", "cancel"):
        assert command in out


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["validate", "--help"]])
def test_help_documents_every_exit_code(args: list[str]) -> None:
    result = runner.invoke(app, args, terminal_width=400)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for code in (
        "0 succeeded",
        "65 invalid input",
        "75 interrupted",
        "2 wrong command line",
        "1 failed (retryable",
    ):
        assert code in text, (code, text)


def test_run_with_overrides_writes_outputs(tiny_model_dir: Path, tmp_path: Path) -> None:
    job = _job(tmp_path, tiny_model_dir, REPO / "examples" / "data" / "instructions.jsonl")
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "run",
            str(job),
            "--output",
            str(out),
            "--set",
            "training.maxSteps=2",
            "--set",
            "training.batchSize=4",
            "--set",
            "training.saveSteps=2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Succeeded" in result.output
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    assert (out / "adapter" / "adapter_config.json").exists()


def test_run_invalid_spec_exits_65_naming_the_field(tmp_path: Path, tiny_model_dir: Path) -> None:
    job = _job(
        tmp_path, tiny_model_dir, tmp_path / "x.jsonl", method={"type": "full", "lora": {"r": 4}}
    )
    result = runner.invoke(app, ["run", str(job)])
    assert result.exit_code == 65
    assert "spec.method.lora" in result.output


def test_validate_reports_bad_lines_without_loading_the_model(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "d.jsonl"
    rows = [{"instruction": f"Say {i}", "input": "", "output": f"{i}"} for i in range(30)]
    lines = [json.dumps(r) for r in rows]
    lines[4] = '{"instruction": "broken"'
    lines[9] = json.dumps({"instruction": "x", "input": "", "output": ""})
    data.write_text("\n".join(lines) + "\n")
    # a model directory with only the tokenizer: validate must not need the weights
    tok_only = tmp_path / "tok"
    shutil.copytree(tiny_model_dir, tok_only)
    for weights in tok_only.glob("*.safetensors"):
        weights.unlink()
    result = runner.invoke(app, ["validate", str(_job(tmp_path, tok_only, data))])
    assert result.exit_code == 65, result.output
    assert "d.jsonl:5" in result.output and "d.jsonl:10" in result.output


def test_validate_ok(tiny_model_dir: Path, tmp_path: Path) -> None:
    job = _job(tmp_path, tiny_model_dir, REPO / "examples" / "data" / "instructions.jsonl")
    result = runner.invoke(app, ["validate", str(job)])
    assert result.exit_code == 0, result.output
    assert "dataset OK" in result.output and "alpaca" in result.output


def test_validate_checks_the_generation_eval_prompts(tiny_model_dir: Path, tmp_path: Path) -> None:
    good = _job(
        tmp_path,
        tiny_model_dir,
        REPO / "examples" / "data" / "instructions.jsonl",
        evaluation={"generation": {"examples": 5}},
    )
    result = runner.invoke(app, ["validate", str(good)])
    assert result.exit_code == 0, result.output
    assert "generation eval OK: 5 held-out prompts" in result.output

    notes = tmp_path / "notes.jsonl"
    notes.write_text("".join(json.dumps({"text": f"note {i}"}) + "\n" for i in range(30)))
    doc = yaml.safe_load(good.read_text())
    doc["spec"]["dataset"] = {
        "source": str(notes),
        "format": "auto",
        "validation": {"splitRatio": 0.2},
    }
    good.write_text(yaml.safe_dump(doc))
    result = runner.invoke(app, ["validate", str(good)])
    assert result.exit_code == 65, result.output
    assert "evaluation.generation" in result.output


# -- user errors: one line naming what to fix, exit 65, no traceback ---------------------------
def assert_user_error(result: Result, *fragments: str) -> str:
    """Exit 65, no traceback, and every fragment in the output; returns the output in one line."""
    text = " ".join(result.output.split())
    assert result.exit_code == 65, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in text, (fragment, result.output)
    return text


BASE = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
BASE["spec"]["model"]["source"] = "./no-such-model"  # whatever passes admission stops at 65
LEAVES = [
    "metadata.name",
    "spec.dataset.source",
    "spec.training.seed",
    "spec.method.lora.r",
    "spec.training.learningRate",
    "spec.output.uri",
    "spec.resources.memory",
    "spec.task",
]
encodings = st.sampled_from(["utf-8", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1"])
yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=40)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=30,
)
huge = st.one_of(
    st.text(min_size=3000, max_size=5000),
    st.integers(10**300, 10**400),
    st.sampled_from([float("inf"), float("nan"), -1e308, 2**64]),
    st.integers(30, 300).map(lambda n: functools.reduce(lambda v, _: [v], range(n), 1)),
)


def _with_leaf(path: str, value: Any) -> bytes:
    doc = copy.deepcopy(BASE)
    node = doc
    *parents, last = path.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    return yaml.safe_dump(doc, allow_unicode=True).encode()


spec_files = st.one_of(
    st.binary(max_size=3000),
    st.builds(lambda t, enc: t.encode(enc, errors="replace"), st.text(max_size=400), encodings),
    st.builds(
        lambda enc: yaml.safe_dump(BASE).encode(enc), encodings.filter(lambda e: e != "utf-8")
    ),
    st.builds(lambda v: yaml.safe_dump(v, allow_unicode=True).encode(), yaml_values),
    st.builds(lambda v: yaml.safe_dump({"kind": "FineTuneJob", "spec": v}).encode(), yaml_values),
    st.builds(
        lambda n, opener: opener * n,
        st.integers(60, 20_000),
        st.sampled_from([b"[", b"{a: ", b"- "]),
    ),
    st.builds(_with_leaf, st.sampled_from(LEAVES), st.one_of(huge, yaml_values)),
)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(content=spec_files)
def test_no_spec_file_content_makes_a_traceback(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "job.yaml"
    path.write_bytes(content)
    assert_user_error(runner.invoke(app, ["validate", str(path)]))


@pytest.mark.parametrize("make", ["missing", "directory"])
def test_a_spec_file_that_cannot_be_opened_is_exit_2(tmp_path: Path, make: str) -> None:
    path = tmp_path / "job.yaml"
    if make == "directory":
        path.mkdir()
    for command in ("run", "validate"):
        result = runner.invoke(app, [command, str(path)])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        says = "does not exist" if make == "missing" else "is a directory"
        assert f"'{path}' {says}" in " ".join(result.output.replace("│", " ").split())


def test_a_name_that_would_leave_the_outputs_directory_writes_nothing(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FINETUNE_PVC_ROOT", raising=False)
    (tmp_path / "README.md").write_text("mine")
    job = _job(tmp_path, tiny_model_dir, REPO / "examples" / "data" / "instructions.jsonl")
    for name in ("..", "../../x", "."):
        doc = yaml.safe_load(job.read_text())
        doc["metadata"]["name"] = name
        job.write_text(yaml.safe_dump(doc))
        assert_user_error(runner.invoke(app, ["run", str(job)]), "metadata.name: ")
    assert (tmp_path / "README.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "job.yaml"]


def _unwritable(tmp_path: Path) -> Path:
    """A directory this process cannot create files in (root ignores modes: use /sys)."""
    if os.geteuid() == 0:
        return Path("/sys/finetune-test-output")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    return locked / "out"


def test_an_output_that_is_a_file_or_not_writable_is_a_user_error(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    job = _job(tmp_path, tiny_model_dir, REPO / "examples" / "data" / "instructions.jsonl")
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    assert_user_error(
        runner.invoke(app, ["run", str(job), "-o", str(a_file)]), f"--output {a_file}"
    )
    locked = _unwritable(tmp_path)
    assert_user_error(
        runner.invoke(app, ["run", str(job), "-o", str(locked)]), f"--output {locked}"
    )
    too_long = tmp_path / ("x" * 300)
    assert_user_error(
        runner.invoke(app, ["run", str(job), "-o", str(too_long)]), "File name too long"
    )


def test_qlora_without_a_gpu_is_a_user_error_before_any_work(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    job = _job(
        tmp_path,
        tiny_model_dir,
        tmp_path / "not-read.jsonl",
        method={"type": "qlora"},
        resources={"gpus": 1},
    )
    text = assert_user_error(runner.invoke(app, ["run", str(job), "-o", str(tmp_path / "o")]))
    assert "method.type: qlora loads the base model in 4 bits, which needs a CUDA GPU" in text


def test_an_unreadable_dataset_file_is_a_user_error(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "secret.jsonl"
    data.write_text('{"text": "x"}\n')
    data.chmod(0)
    if os.geteuid() == 0:  # root reads anything: let the file system say no, as it would
        import fsspec

        real = fsspec.open

        def refuse(url: str, *args: Any, **kwargs: Any) -> Any:
            if url == str(data):
                raise PermissionError(13, "Permission denied", url)
            return real(url, *args, **kwargs)

        monkeypatch.setattr(fsspec, "open", refuse)
    job = _job(tmp_path, tiny_model_dir, data)
    assert_user_error(runner.invoke(app, ["validate", str(job)]), f"{data}: Permission denied")
    result = runner.invoke(app, ["run", str(job), "-o", str(tmp_path / "o")])
    assert_user_error(result, f"{data}: Permission denied")


def test_a_dataset_name_too_long_for_the_file_system_is_a_user_error(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    data = tmp_path / ("d" * 300 + ".jsonl")
    job = _job(tmp_path, tiny_model_dir, data)
    assert_user_error(runner.invoke(app, ["validate", str(job)]), "File name too long")


def test_an_s3_source_without_credentials_is_a_user_error(
    tmp_path: Path, tiny_model_dir: Path, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("FINETUNE_S3_ENDPOINT_URL", moto_endpoint + "/")  # a fresh s3fs instance
    job = _job(tmp_path, tiny_model_dir, Path("unused"))
    doc = yaml.safe_load(job.read_text())
    doc["spec"]["dataset"]["source"] = "s3://bucket/train.jsonl"
    job.write_text(yaml.safe_dump(doc))
    assert_user_error(
        runner.invoke(app, ["validate", str(job)]),
        "s3://bucket/train.jsonl: no credentials: set AWS_ACCESS_KEY_ID",
    )


def test_debug_shows_the_traceback_of_a_user_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    job = _job(tmp_path, tiny_model_dir, tmp_path / "x.jsonl")
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    quiet = runner.invoke(app, ["run", str(job), "-o", str(a_file)])
    loud = runner.invoke(app, ["run", str(job), "-o", str(a_file), "--debug"])
    assert quiet.exit_code == loud.exit_code == 65
    assert "Traceback" not in quiet.output and "Traceback" in loud.output


def test_validate_reports_each_source_with_its_own_count(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    rows = [json.loads(line) for line in (REPO / "examples/data/instructions.jsonl").open()]
    parts = {"train": rows[:40], "val": rows[40:50], "test": rows[50:55]}
    for name, part in parts.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    job = _job(tmp_path, tiny_model_dir, tmp_path / "train.jsonl")
    doc = yaml.safe_load(job.read_text())
    doc["spec"]["dataset"]["validation"] = {"source": str(tmp_path / "val.jsonl")}
    doc["spec"]["dataset"]["test"] = {"source": str(tmp_path / "test.jsonl")}
    job.write_text(yaml.safe_dump(doc))
    result = runner.invoke(app, ["validate", str(job)], terminal_width=400)
    assert result.exit_code == 0, result.output
    assert f"train: {tmp_path / 'train.jsonl'} (40 records)" in result.output
    assert f"validation: {tmp_path / 'val.jsonl'} (10 records)" in result.output
    assert f"test: {tmp_path / 'test.jsonl'} (5 records)" in result.output
    assert "55 records" not in result.output


# -- outages: retryable (exit 1), said to be transient, no traceback ----------------------------
def test_a_hub_outage_is_transient_not_invalid_input(tmp_path: Path) -> None:
    """The real console script, with HF_ENDPOINT at a server answering 503."""
    hub = FakeServer(503)
    job = tmp_path / "job.yaml"
    doc = copy.deepcopy(BASE)
    doc["spec"]["model"]["source"] = "hf://acme/tiny"
    job.write_text(yaml.safe_dump(doc))
    env = {
        **without_venv_on_path(),
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "0",
        "COLUMNS": "400",
    }
    try:
        done = {
            command: subprocess.run(
                [console_script(), command, str(job), *extra],
                capture_output=True,
                text=True,
                env=env,
                cwd=tmp_path,
                timeout=300,
            )
            for command, extra in (("validate", []), ("run", ["-o", str(tmp_path / "o")]))
        }
    finally:
        hub.close()
    for command, proc in done.items():
        output = proc.stdout + proc.stderr
        assert proc.returncode == 1, (command, output)
        assert "Traceback" not in output, (command, output)
        assert "model.source: hf://acme/tiny: the server answered 503" in output, (command, output)
        assert "transient" in output
    assert hub.requests >= 2


def test_ci_runs_the_readme_test_command_verbatim_without_activating_the_venv() -> None:
    readme = (REPO / "README.md").read_text()
    block = readme.split("# 2. install, then run the tests\n", 1)[1].split("\n", 1)[0]
    assert block == "scripts/setup.sh && .venv/bin/python -m pytest"
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert block in ci
    commands = [line for line in ci if line.strip() and not line.lstrip().startswith("#")]
    assert not [line for line in commands if "activate" in line]


def test_a_progress_port_in_use_is_a_command_line_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        job = tmp_path / "job.yaml"
        job.write_text(yaml.safe_dump(BASE))
        result = runner.invoke(app, ["run", str(job), "--progress-port", str(port)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert f"cannot serve on port {port}" in " ".join(result.output.replace("│", " ").split())


def test_run_reports_to_mlflow_and_a_longer_rerun_continues_the_same_mlflow_run(
    tiny_model_dir: Path, tmp_path: Path, mlflow_server: str
) -> None:
    from mlflow import MlflowClient

    job = _job(
        tmp_path,
        tiny_model_dir,
        REPO / "examples" / "data" / "instructions.jsonl",
        tracking={"mlflow": {"trackingUri": mlflow_server, "experiment": "cli-resume"}},
    )
    out = tmp_path / "out"
    common = ["run", str(job), "--output", str(out), "--set", "training.batchSize=4"]
    common += ["--set", "training.loggingSteps=1"]
    short = [*common, "--set", "training.maxSteps=2", "--set", "training.saveSteps=2"]
    first = runner.invoke(app, short, terminal_width=400)
    assert first.exit_code == 0, first.output
    run_id = json.loads((out / "tracking.json").read_text())["mlflow"]
    assert run_id in first.output
    longer = [*common, "--set", "training.maxSteps=4", "--set", "training.saveSteps=2"]
    second = runner.invoke(app, longer, terminal_width=400)
    assert second.exit_code == 0, second.output
    assert json.loads((out / "tracking.json").read_text())["mlflow"] == run_id
    assert "mlflow: stopped" not in second.output
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("cli-resume")
    assert experiment is not None
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    run = client.get_run(run_id)
    assert (run.info.run_name, run.info.status) == ("quickstart", "FINISHED")
    # params never change in MLflow: the longer resumed run says so in a tag
    assert run.data.params["finetune.maxSteps"] == "2"
    assert run.data.tags["finetune.maxSteps.resumed"] == "4"
    assert run.data.metrics["steps"] == 4
    assert "MLFLOW_MAX_LOG_PARAMS" not in os.environ


def test_wandb_online_needs_its_key(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from `wandb login`
    data = REPO / "examples" / "data" / "instructions.jsonl"
    tracking = {"wandb": {"project": "p"}}
    no_secret = _job(tmp_path, tiny_model_dir, data, tracking=tracking)
    result = runner.invoke(app, ["validate", str(no_secret)], terminal_width=400)
    assert result.exit_code == 65
    assert "spec.secrets.wandb: W&B online mode needs an API key" in result.output
    no_key = _job(
        tmp_path, tiny_model_dir, data, tracking=tracking, secrets={"wandb": {"name": "wandb"}}
    )
    result = runner.invoke(app, ["run", str(no_key), "--output", str(tmp_path / "o")])
    assert result.exit_code == 65, result.output
    assert "tracking.wandb: no API key: set WANDB_API_KEY" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_the_final_summary_links_the_trackers() -> None:
    from finetune_trainer.cli import _summary_table
    from finetune_trainer.progress import Outcome, Summary, TrackerInfo
    from rich.console import Console

    summary = Summary(
        outcome=Outcome.SUCCEEDED,
        trackers=[
            TrackerInfo(name="mlflow", url="http://m:5000/#/experiments/1/runs/abc"),
            TrackerInfo(name="tensorboard", location="out/tensorboard", error="end: OSError: x"),
        ],
    )
    console = Console(width=200, record=True)
    console.print(_summary_table(summary))
    text = console.export_text()
    assert "http://m:5000/#/experiments/1/runs/abc" in text
    assert "out/tensorboard (stopped: end: OSError: x)" in text
