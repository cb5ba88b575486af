#!/usr/bin/env bash
# Create .venv in the repository and install refiner with its test and export extras.
# PyTorch 2.14.1 / torchvision 0.29.1 are the builds this project is tested with (pyproject.toml
# accepts any torch >= 2.4); set REFINER_TORCH="" to keep whatever pip resolves instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
TORCH=${REFINER_TORCH-"torch==2.14.1 torchvision==0.29.1"}
if [ -n "$TORCH" ]; then
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install --quiet $TORCH
fi
.venv/bin/python -m pip install --quiet -e '.[dev,export]'
