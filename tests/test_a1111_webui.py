"""The extension on the real webui code: A1111 / Forge / Forge Classic checkouts named in ``WEBUI_PATH``.

``WEBUI_PATH`` is one checkout or several joined by the path separator (``:``); without it the test is skipped.
From each checkout it imports the real ``modules/scripts.py``, ``script_loading.py``, ``modelloader.py``,
``upscaler.py``, ``scripts_postprocessing.py``, ``shared_state.py``, ``ui_components.py`` and
``scripts/postprocessing_upscale.py``; ``shared``, ``devices``, ``paths``, ``extensions``, ``script_callbacks``,
``ui`` and gradio are stand-ins (tests/a1111_webui/standins; Forge Classic also needs stand-ins for spandrel and
``esrgan_model``, Forge for its gradio-4 ``ui_components``). The extension is copied as ``extensions/<name>``,
loaded by ``scripts.load_scripts()`` and ``modelloader.load_upscalers()``, and Extras runs through the real
postprocessing runner, in a ``python -I -S`` subprocess where the extension's folder is the only ``headsup_core``.
Checked with A1111 v1.8.0 (bef51aed032c), Forge dfdcbab6 and 04c6ab68, and Forge Classic 1f95d717. No webui code is committed.
"""
import os
from pathlib import Path

import pytest
from a1111_webui import harness

WEBUIS = [p for p in os.environ.get("WEBUI_PATH", "").split(os.pathsep) if p]


@pytest.mark.slow
@pytest.mark.skipif(not WEBUIS, reason="WEBUI_PATH is not set (a checkout of A1111, Forge or Forge Classic)")
@pytest.mark.parametrize("webui", WEBUIS or ["unset"])
def test_extension_on_real_webui_code(webui, tiny_models, tmp_path):
    webui = Path(webui).resolve()
    for rel in ("modules/scripts.py", "modules/upscaler.py", "scripts/postprocessing_upscale.py"):
        assert (webui / rel).is_file(), f"WEBUI_PATH entry {webui} has no {rel}: not a webui checkout"
    r = harness.run(tmp_path, tiny_models, harness.standins_for(webui) + [str(webui)], webui,
                    webui / "scripts" / "postprocessing_upscale.py")
    harness.check_common(r)
    if r["syspath_restored"]:  # A1111: the extension folder is gone from sys.path once the script is loaded
        assert not r["ext_root_on_syspath"]
    upscaler_py = (webui / "modules" / "upscaler.py").read_text()
    if "UPSCALE_ITERATIONS" in upscaler_py:  # Forge Classic's loop calls do_upscale first, up to 4 times
        assert r["interrupt"]["do_upscale_calls"] == 4
    if (webui / "modules_forge").is_dir():  # Forge variants: the lookup of prepare_free_memory is reported
        assert "prepare_free_memory" in r["stdout"]
        where = "forge_util" if (webui / "modules_forge" / "forge_util.py").is_file() else "modules_forge.utils"
        assert where in r["stdout"]
