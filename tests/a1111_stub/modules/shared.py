"""Stand-in for modules.shared: models_path, opts, cmd_opts, state, device."""
import types

models_path = "models"  # tests point this at a tmp folder
device = "cpu"
opts = types.SimpleNamespace(ESRGAN_tile=192, ESRGAN_tile_overlap=8)
cmd_opts = types.SimpleNamespace(no_half=False)


class State:
    interrupted = False
    skipped = False
    job_timestamp = "0"
    sampling_step = 0
    sampling_steps = 0

    def interrupt(self):
        self.interrupted = True


state = State()
