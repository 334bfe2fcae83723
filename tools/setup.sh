#!/usr/bin/env bash
# Create ./.venv and install HeadsUp with every extra (faces, training, evaluation, tests). Safe to re-run.
# torch comes from the package registry (the CUDA build; it runs on the CPU too): see DESIGN notes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.15.0" "torchvision==0.29.2"
.venv/bin/python -m pip install --quiet -e ".[faces,train,eval,dev]"
.venv/bin/python -c "import headsup_core, torch, diffusers; print('HeadsUp', headsup_core.__version__, '| torch', torch.__version__, '| diffusers', diffusers.__version__)"
