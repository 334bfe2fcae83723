"""Loads the pack the way ComfyUI does (a package from its __init__.py, then `await comfy_entrypoint()`),
against the stand-in modules in this folder. Tests only."""
import asyncio
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

STUB_DIR = Path(__file__).resolve().parent
PACK_DIR = STUB_DIR.parents[1]
PACK_MODULE = "headsup_pack_under_test"
_STUB_ROOTS = ("comfy", "comfy_api", "folder_paths")


def _is_ours(name):
    return name.split(".")[0] in _STUB_ROOTS or name == PACK_MODULE or name.startswith(PACK_MODULE + ".")


def import_pack_root(name=PACK_MODULE):
    spec = importlib.util.spec_from_file_location(name, PACK_DIR / "__init__.py",
                                                  submodule_search_locations=[str(PACK_DIR)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_pack(models_dir):
    """Put the stand-in on sys.path, point folder_paths at `models_dir`, import the pack, return its nodes."""
    unload()
    sys.path.insert(0, str(STUB_DIR))
    import folder_paths

    folder_paths.reset(models_dir)
    root = import_pack_root()
    ext = asyncio.run(root.comfy_entrypoint())
    nodes = asyncio.run(ext.get_node_list())
    import comfy.model_management as mm
    import comfy.utils

    return SimpleNamespace(root=root, extension=ext, nodes={n.GET_SCHEMA().node_id: n for n in nodes},
                           folder_paths=folder_paths, mm=mm, utils=comfy.utils,
                           module=lambda sub: sys.modules[f"{PACK_MODULE}.{sub}"])


def unload():
    for name in [n for n in sys.modules if _is_ours(n)]:
        del sys.modules[name]
    while str(STUB_DIR) in sys.path:
        sys.path.remove(str(STUB_DIR))
