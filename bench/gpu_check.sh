#!/usr/bin/env bash
# The GPU check (issue 25; docs/benchmark.md, "GPU check"): on one NVIDIA GPU, with nothing downloaded, in
# under 10 minutes. Installs what the pack needs and the box lacks from .gpu_wheels/ (filled beforehand by
# bench/gpu_wheels.sh on a machine with network), then runs python -m bench.gpu_check with these arguments.
#
#   bash bench/gpu_check.sh                          # CUDA: the three sizes, fp16/bf16, with/without compile
#   bash bench/gpu_check.sh --device cpu --dry-run   # the same code, small and quick, on a CPU
#   COMFYUI_PATH=.comfyui bash bench/gpu_check.sh    # also the ComfyUI paths, in-process in that checkout
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${HEADSUP_GPU_WHEELS:-.gpu_wheels}

install_missing() {  # $1: python; $2: "module=package ..." pairs; installs the packages whose module is absent
  local missing
  missing=$("$1" - "$2" <<'PYEOF'
import importlib.util, sys
pairs = [p.split("=", 1) for p in sys.argv[1].split()]
print(" ".join(pkg for mod, pkg in pairs if importlib.util.find_spec(mod) is None))
PYEOF
)
  [ -z "$missing" ] && return 0
  if [ ! -d "$WHEELS" ]; then
    echo "gpu_check: $missing not installed and no $WHEELS folder: run 'bash bench/gpu_wheels.sh' on a machine" \
         "with network and bring the folder along." >&2
    exit 2
  fi
  echo "gpu_check: installing $missing from $WHEELS (no network)" >&2
  "$1" -m pip install --quiet --no-index --find-links "$WHEELS" --no-deps $missing
}

PACK="diffusers=diffusers importlib_metadata=importlib-metadata zipp=zipp einops=einops clip=openai-clip ftfy=ftfy wcwidth=wcwidth"
install_missing "$PY" "$PACK"
if [ -n "${COMFYUI_PATH:-}" ]; then
  COMFY_PY=${COMFYUI_PYTHON:-$PY}
  install_missing "$COMFY_PY" "$PACK"
  if [ -f "$WHEELS/comfyui-requirements.txt" ] && ! "$COMFY_PY" -c "import torchsde, spandrel" 2>/dev/null; then
    echo "gpu_check: installing ComfyUI's requirements from $WHEELS (no network)" >&2
    "$COMFY_PY" -m pip install --quiet --no-index --find-links "$WHEELS" -r "$WHEELS/comfyui-requirements.txt"
  fi
  export COMFYUI_PATH=$(cd "$COMFYUI_PATH" && pwd) COMFYUI_PYTHON=$COMFY_PY
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m bench.gpu_check "$@"
