#!/usr/bin/env bash
# Installs what tests/test_comfyui_browser.py needs besides a ComfyUI checkout: Debian's Chromium and the
# Playwright Python package (driving the system Chromium, so no browser download). It does not fetch ComfyUI.
#
#   tools/install_browser_test.sh [PYTHON...]
#
# PYTHON: the interpreter(s) that will run pytest (default: .venv/bin/python if present, else python3).
# Then: COMFYUI_PATH=/path/to/ComfyUI .venv/bin/python -m pytest tests/test_comfyui_browser.py
# The ComfyUI venv also needs the frontend that ComfyUI pins:
#   pip install "$(grep comfyui-frontend-package "$COMFYUI_PATH/requirements.txt")"
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
    else
        echo "Install Chromium with your package manager, or set CHROMIUM_PATH to a Chromium binary." >&2
        exit 1
    fi
fi

if [ "$#" -eq 0 ]; then
    if [ -x .venv/bin/python ]; then set -- .venv/bin/python; else set -- python3; fi
fi
for py in "$@"; do
    "$py" -m pip install -q playwright
    "$py" -c "import playwright.sync_api" && echo "playwright ready for $py"
done
echo "chromium: $(command -v chromium || command -v chromium-browser)"
