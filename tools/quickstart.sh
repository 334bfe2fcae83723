#!/usr/bin/env bash
# The main job on a fresh machine: install, write the tiny random models, and upscale a real group photo x4.
# Tiny random weights make a valid but meaningless picture; swap in real weights with the command printed last.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
. .venv/bin/activate
PHOTO="$(python -c 'import insightface, os; print(os.path.join(os.path.dirname(insightface.__file__), "data", "images", "t1.jpg"))')"
headsup make-tiny out/tiny
headsup upscale "$PHOTO" -o out/t1_x4.png --scale 4 \
  --base out/tiny/base.safetensors --weights out/tiny/headsup.safetensors --overwrite
echo
echo "Wrote out/t1_x4.png (tiny random weights: a pipeline check, not a real restoration)."
echo "With real models:  headsup upscale photo.jpg -o photo_x4.png --base v2-1_512-ema-pruned.safetensors --weights osediff.pkl"
