"""Stand-in for modules.shared: paths, opts (with add_option), cmd_opts, OptionInfo, sd_upscalers, state."""
import os
import sys
import types

from modules.shared_state import State

models_path = "models"  # tests point this at a tmp folder
script_path = os.getcwd()
device = "cpu"
progress_print_out = sys.stdout
sd_upscalers = []
cmd_opts = types.SimpleNamespace(no_half=False, ckpt_dir=None)


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 **kwargs):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.section = section


class Options(types.SimpleNamespace):
    def add_option(self, key, info):
        if not hasattr(self, key):
            setattr(self, key, info.default)


opts = Options(ESRGAN_tile=192, ESRGAN_tile_overlap=8, upscaling_max_images_in_cache=5)
state = State()
