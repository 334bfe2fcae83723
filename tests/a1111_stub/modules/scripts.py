"""Stand-in for modules.scripts: load_scripts() with A1111's temporary sys.path around each extension script."""
import inspect
import os
import sys
from collections import namedtuple

from modules import extensions, paths, script_callbacks, scripts_postprocessing

ScriptFile = namedtuple("ScriptFile", ["basedir", "filename", "path"])
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
postprocessing_scripts_data = []
scripts_postproc = None
# Forge keeps extension folders on sys.path; A1111 restores the old list
keep_paths = os.environ.get("A1111_STUB_LOOP", "a1111") != "a1111"


def load_module(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_scripts():
    global scripts_postproc
    postprocessing_scripts_data.clear()
    script_callbacks.clear_callbacks()
    files = []
    root_scripts = os.path.join(paths.script_path, "scripts")
    if os.path.isdir(root_scripts):
        files += [ScriptFile(paths.script_path, f, os.path.join(root_scripts, f))
                  for f in sorted(os.listdir(root_scripts)) if f.endswith(".py")]
    for ext in extensions.active():
        files += ext.list_files("scripts", ".py")
    saved = sys.path
    for f in files:
        try:
            if f.basedir != paths.script_path:
                sys.path = [f.basedir] + sys.path  # a new list: anything appended to it is dropped below
            module = load_module(f.path)
            for obj in module.__dict__.values():
                if inspect.isclass(obj) and issubclass(obj, scripts_postprocessing.ScriptPostprocessing) \
                        and obj is not scripts_postprocessing.ScriptPostprocessing:
                    postprocessing_scripts_data.append(ScriptClassData(obj, f.path, f.basedir, module))
        finally:
            if keep_paths:
                saved = sys.path
            sys.path = saved
    scripts_postproc = scripts_postprocessing.ScriptPostprocessingRunner()
