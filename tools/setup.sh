#!/usr/bin/env bash
# Create ./.venv and install HeadsUp with every extra (faces, training, evaluation, tests, scale-out curation, 16-bit TIFF). Safe to re-run.
# torch comes from the package registry (the CUDA build; it runs on the CPU too): see DESIGN notes.
# Every version comes from the committed lock tools/constraints.txt (refresh it with `bash tools/lock.sh`), so CI, the
# quick start and the README's test command get the same releases on every machine. `bash tools/check_latest.sh`
# runs the suite on the newest releases instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
CONSTRAINTS="${HEADSUP_CONSTRAINTS-tools/constraints.txt}"  # empty: unlocked (tools/check_latest.sh)
lock=()
[ -n "$CONSTRAINTS" ] && lock=(--constraint "$CONSTRAINTS")
.venv/bin/python -m pip install --quiet "${lock[@]}" "torch==2.15.0" "torchvision==0.29.2"
.venv/bin/python -m pip install --quiet "${lock[@]}" -e ".[faces,train,eval,dev,scale,tiff]"
.venv/bin/python -c "import headsup_core, torch, diffusers; print('HeadsUp', headsup_core.__version__, '| torch', torch.__version__, '| diffusers', diffusers.__version__)"
