#!/usr/bin/env bash
# Fill .gpu_wheels/ (ignored by git, never committed) with the wheels the GPU check installs on a box that has
# torch, transformers, peft, accelerate and safetensors but no diffusers and no network. Run it on a machine
# with network, from anywhere; versions come from tools/constraints.txt (the lock). With COMFYUI_PATH set it
# also fetches ComfyUI's own requirements (torch* excepted) for the ComfyUI part of the check.
#
#   bash bench/gpu_wheels.sh [--python-version 3.11]    # default: this machine's python3
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${HEADSUP_GPU_WHEELS:-.gpu_wheels}
PYVER=$($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if [ "${1:-}" = "--python-version" ]; then PYVER=${2:?--python-version needs a value like 3.11}; fi
# What the pack imports beyond the GPU box's torch/transformers/peft/accelerate/safetensors: pure-Python
# packages, fetched without their dependencies (the box's transformers already brings huggingface-hub,
# numpy, regex, requests, tqdm and PyYAML). openai-clip ships as a source archive: built into a wheel here.
PACKAGES="diffusers importlib-metadata zipp einops openai-clip ftfy wcwidth"
mkdir -p "$DEST"
pins=()
for name in $PACKAGES; do
  pin=$(grep -i -m1 "^${name}==" tools/constraints.txt | cut -d' ' -f1 || true)
  [ -n "$pin" ] || { echo "gpu_wheels: $name is not in tools/constraints.txt" >&2; exit 1; }
  pins+=("$pin")
done
echo "gpu_wheels: ${pins[*]} -> $DEST" >&2
$PY -m pip wheel --quiet --no-deps --wheel-dir "$DEST" "${pins[@]}"
if [ -n "${COMFYUI_PATH:-}" ]; then
  # ComfyUI's requirements for Python $PYVER on x86-64 Linux, binary wheels only, torch* left to the box.
  grep -v -i -E '^\s*(#|$|torch)' "$COMFYUI_PATH/requirements.txt" > "$DEST/comfyui-requirements.txt"
  $PY -m pip download --quiet --dest "$DEST" --only-binary=:all: --python-version "$PYVER" \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform linux_x86_64 \
      -r "$DEST/comfyui-requirements.txt"
fi
du -sh "$DEST" >&2
