#!/usr/bin/env bash
# Drift check: build a throwaway venv from the NEWEST releases pyproject.toml allows (ignoring the lock in
# tools/constraints.txt) and run the whole suite there, as CI would. Users installing into ComfyUI/A1111 get new
# releases before our lock does; this catches a breaking release before they hit it.
# Usage: bash tools/check_latest.sh [pytest args...]   (prints the resolved versions first)
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d "${TMPDIR:-/tmp}/headsup-latest.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir "$work/main"
git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$work/main"   # a clean copy of the tracked tree
if [ -d ../shared ]; then ln -s "$(cd ../shared && pwd)" "$work/shared"; fi   # tests read ../shared/data
cd "$work/main"
HEADSUP_CONSTRAINTS="" bash tools/setup.sh
.venv/bin/python -m pip list --format=freeze 2>/dev/null \
  | grep -iE '^(torch|torchvision|diffusers|transformers|peft|huggingface.hub|accelerate|kernels|bitsandbytes|safetensors|numpy|pyiqa|insightface|onnxruntime|facexlib|dlib-bin)==' \
  | tr '\n' ' '; echo
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/python -m pytest -q "$@"
