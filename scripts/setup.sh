#!/usr/bin/env bash
# Create .venv and install dpkfac with its test tools. torch is pinned to the CPU wheel first
# (torch==2.13.0), so the CPU default never pulls a multi-GB CUDA build. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==${DPKFAC_TORCH:-2.13.0}"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
