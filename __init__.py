"""ComfyUI entry point of the HeadsUp node pack.

ComfyUI imports this file as a package and awaits `comfy_entrypoint()` (node API V3). It must import
cleanly without ComfyUI (the test suite imports it), so everything that touches `comfy_api`, `comfy` or
`folder_paths` lives in the `nodes` subpackage, imported only from inside `comfy_entrypoint`.
We deliberately do not export NODE_CLASS_MAPPINGS: ComfyUI checks V1 first and would skip V3.
"""
import importlib.util
import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))


def _make_core_importable():
    # Installed with `git clone` + `pip install -r requirements.txt`, headsup_core is not on sys.path.
    # Append (never prepend): a prepended pack dir would shadow ComfyUI's own top-level `nodes` module.
    if importlib.util.find_spec("headsup_core") is None and _PACK_DIR not in sys.path:
        sys.path.append(_PACK_DIR)


_make_core_importable()


async def comfy_entrypoint():
    from .nodes import HeadsUpExtension

    return HeadsUpExtension()
