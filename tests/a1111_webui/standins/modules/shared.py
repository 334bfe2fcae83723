"""Stand-in for modules.shared: paths, cmd_opts, opts (with add_option), OptionInfo, sd_upscalers, state."""
import os
import sys
import types

script_path = os.getcwd()
models_path = os.path.join(script_path, "models")
data_path = script_path
device = "cpu"
progress_print_out = sys.stdout
sd_upscalers = []
state = None  # the driver puts the real shared_state.State() here
cmd_opts = types.SimpleNamespace(no_half=False, ckpt_dir=None, headsup_models_path=None)


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 **kwargs):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.section = section


class Options:
    def __init__(self, defaults):
        object.__setattr__(self, "data", dict(defaults))
        object.__setattr__(self, "data_labels", {})

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, name):
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self.data[name] = value


opts = Options({"ESRGAN_tile": 192, "ESRGAN_tile_overlap": 8, "upscaling_max_images_in_cache": 5,
                "postprocessing_operation_order": [], "postprocessing_disable_in_extras": [],
                "postprocessing_enable_in_main_ui": [],
                "enable_upscale_progressbar": False})


def walk_files(path, allowed_extensions=None):
    for root, _, files in os.walk(path, followlinks=True):
        for f in files:
            if allowed_extensions is None or os.path.splitext(f)[1].lower() in allowed_extensions:
                yield os.path.join(root, f)
