#!/usr/bin/env bash
# Refresh tools/constraints.txt, the locked test/dev environment that tools/setup.sh (and so CI and the quick start)
# installs from. Run it on purpose, then run the suite (bash .ci/run) before committing the new lock.
# It resolves the newest releases that pyproject.toml allows, for every Python the project supports (uv --universal),
# with torch/torchvision held at the versions below. requirements.txt and pyproject.toml stay loose for the hosts.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH="${TORCH:-torch==2.15.0}"
TORCHVISION="${TORCHVISION:-torchvision==0.29.2}"
tooldir="$(mktemp -d)"
trap 'rm -rf "$tooldir"' EXIT
python3 -m venv "$tooldir/venv"
"$tooldir/venv/bin/python" -m pip install --quiet --disable-pip-version-check "uv>=0.5"
printf '%s\n%s\n' "$TORCH" "$TORCHVISION" | "$tooldir/venv/bin/uv" pip compile --quiet --universal \
  --extra faces --extra train --extra eval --extra dev --extra scale --extra tiff \
  --custom-compile-command "bash tools/lock.sh" \
  pyproject.toml - -o tools/constraints.txt
echo "Wrote tools/constraints.txt; now run: bash .ci/run"
