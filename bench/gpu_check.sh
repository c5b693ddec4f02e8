#!/usr/bin/env bash
# The GPU check of issue 11 on one GPU machine with nothing but this repo and the package registries:
# installs what is missing (torch from PyPI is a CUDA build), then runs bench/gpu_check.py, which
# prints one Markdown table (checks, images/s ours vs diffusers, a Ray job vs the bare loop).
#   bash bench/gpu_check.sh                      # everything (sized for <= 8 min on one H200)
#   bash bench/gpu_check.sh --models sd15 --skip job
#   bash bench/gpu_check.sh --smoke              # CPU, tiny pipelines: checks the script itself
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -c "import ray, diffusers, pipeline" 2>/dev/null || .venv/bin/python -m pip install -q -c constraints.txt -e .
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
exec .venv/bin/python bench/gpu_check.py "$@"
