"""HeadsUp for AUTOMATIC1111 stable-diffusion-webui and Forge (this repository cloned into ``extensions/``).

- ``UpscalerHeadsUp``: one upscaler entry per weights file (``.safetensors`` HeadsUp checkpoint or OSEDiff
  ``.pkl``) in ``models/HeadsUp``, so HeadsUp shows up in the Extras tab and the hires-fix upscaler lists.
- ``ScriptPostprocessingHeadsUp``: an Extras section with a reference photo, the colour fix and the tile size;
  its settings apply to HeadsUp upscalers chosen in the same Extras run.

The base model (SD 2.1-base architecture) is ``models/HeadsUp/base`` (a diffusers folder) or
``models/HeadsUp/base.safetensors``/``.ckpt``, or the path in ``$HEADSUP_BASE``. Face models (for references
and face masks) are insightface packs in ``models/insightface/models/<pack>/``.

Checked against A1111 ``modules/upscaler.py`` (01a40c62), ``modelloader.py`` (0114057a),
``scripts_postprocessing.py`` (0cb7262c), ``devices.py`` (0181c1f7) and Forge at dfdcbab6 (2025-06-26).
All model work is ``headsup_core.HeadsUpPipeline``, the same code as the CLI and the ComfyUI nodes.
"""
from __future__ import annotations

import os
import sys

# A1111 puts the extension folder on sys.path only while it imports this file; keep it for lazy imports.
_EXT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _EXT_ROOT not in sys.path:
    sys.path.append(_EXT_ROOT)

from modules import devices, scripts_postprocessing, shared  # noqa: E402
from modules import upscaler as _upscaler  # noqa: E402  (module import: the base classes are not re-registered)

WEIGHTS_EXTS = (".safetensors", ".pkl")
BASE_STEMS = ("base",)
COLOR_FIXES = ("adain", "wavelet", "none")
_DEFAULTS = {"reference": None, "color_fix": "adain", "tile_size": 0, "stamp": None}
_OPTIONS = dict(_DEFAULTS)  # set by the Extras section for the current job
_CACHE: dict = {}  # (base, weights) -> pipeline; one at a time, kept on the CPU between runs
_ANALYZER: dict = {}


def models_dir() -> str:
    return os.path.join(shared.models_path, "HeadsUp")


def find_weights(folder: str | None) -> list[str]:
    """Weights files directly in ``folder`` (the base model's files are not weights)."""
    if not folder or not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(WEIGHTS_EXTS) and os.path.splitext(f)[0].lower() not in BASE_STEMS
                  and os.path.isfile(os.path.join(folder, f)))


def find_base(folder: str) -> str:
    from headsup_core.errors import MissingModelError

    env = os.environ.get("HEADSUP_BASE")
    if env:
        if not os.path.exists(env):
            raise MissingModelError(f"HEADSUP_BASE points to {env}, which does not exist.")
        return env
    candidates = [os.path.join(folder, "base")] + [os.path.join(folder, "base" + e)
                                                   for e in (".safetensors", ".ckpt")]
    for c in candidates:
        if os.path.exists(c):
            return c
    raise MissingModelError(
        f"HeadsUp needs its SD 2.1-base model: put a diffusers folder at {candidates[0]} or a single file at "
        f"{candidates[1]} (or set HEADSUP_BASE).")


def _device_dtype():
    import torch

    dev = getattr(devices, "device", None)
    if dev is None and hasattr(devices, "get_optimal_device"):
        dev = devices.get_optimal_device()
    dev = torch.device(dev or "cpu")
    dtype = getattr(devices, "dtype", None) or torch.float32
    if dev.type == "cpu" or getattr(getattr(shared, "cmd_opts", None), "no_half", False):
        dtype = torch.float32
    return dev, dtype


def _free_memory() -> None:
    """Forge manages VRAM itself: ask it for room first. Classic A1111: empty the cache."""
    try:
        from modules_forge.utils import prepare_free_memory

        prepare_free_memory()
        return
    except Exception:
        pass
    if hasattr(devices, "torch_gc"):
        devices.torch_gc()


def _stamp():
    return getattr(getattr(shared, "state", None), "job_timestamp", None)


def set_options(enable=False, reference=None, color_fix="adain", tile_size=0) -> None:
    _OPTIONS.clear()
    _OPTIONS.update(_DEFAULTS)
    if enable:
        _OPTIONS.update(reference=reference, color_fix=color_fix if color_fix in COLOR_FIXES else "adain",
                        tile_size=int(tile_size or 0), stamp=_stamp())


def current_options() -> dict:
    """The Extras section's settings if they were set in this job, else the defaults (e.g. in hires fix)."""
    return dict(_OPTIONS) if _OPTIONS["stamp"] is not None and _OPTIONS["stamp"] == _stamp() else dict(_DEFAULTS)


def face_analyzer(required: bool):
    """insightface analyzer from models/insightface; None (once reported) if absent and not required."""
    if "value" not in _ANALYZER:
        from headsup_core.errors import HeadsUpError

        try:
            from headsup_core.faces import load_face_analyzer

            root = os.path.join(shared.models_path, "insightface")
            _ANALYZER["value"] = load_face_analyzer("insightface", model_root=root, device=str(_device_dtype()[0]))
        except (HeadsUpError, ImportError) as err:
            _ANALYZER["value"], _ANALYZER["error"] = None, err
            print(f"HeadsUp: no face analyzer, faces get no special treatment: {err}")
    if required and _ANALYZER["value"] is None:
        raise _ANALYZER["error"]
    return _ANALYZER["value"]


def _interrupted() -> bool:
    state = getattr(shared, "state", None)
    return bool(getattr(state, "interrupted", False) or getattr(state, "skipped", False))


class UpscalerHeadsUp(_upscaler.Upscaler):
    def __init__(self, dirname=None):
        self.name = "HeadsUp"
        self.model_path = models_dir()
        self.user_path = dirname
        self.scalers = []
        super().__init__(create_dirs=True)
        seen = set()
        for path in find_weights(self.model_path) + find_weights(dirname):
            stem = os.path.splitext(os.path.basename(path))[0]
            if stem not in seen:
                seen.add(stem)
                self.scalers.append(_upscaler.UpscalerData(f"HeadsUp {stem}", path, self, 4))

    def load_model(self, path: str):
        from headsup_core import HeadsUpPipeline

        key = (find_base(self.model_path), path)
        if key not in _CACHE:
            _CACHE.clear()  # one pipeline at a time
            _CACHE[key] = HeadsUpPipeline.from_files(key[0], weights=path, device="cpu")
        return _CACHE[key]

    def do_upscale(self, img, selected_model):
        from headsup_core.errors import InterruptedByUser

        opts = current_options()
        pipe = self.load_model(selected_model)
        analyzer = face_analyzer(required=opts["reference"] is not None)
        state = getattr(shared, "state", None)

        def progress(done, total):
            if _interrupted():
                raise InterruptedByUser("Interrupted by the user.")
            if state is not None and hasattr(state, "sampling_steps"):
                state.sampling_steps, state.sampling_step = total, done

        _free_memory()
        pipe.to(*_device_dtype())
        try:
            return pipe.upscale(img.convert("RGB"), scale=self.scale, reference=opts["reference"],
                                face_analyzer=analyzer, tile_size=opts["tile_size"] or None,
                                color_fix=opts["color_fix"], progress=progress)
        except InterruptedByUser:
            return img  # A1111's convention: an interrupted step hands its input on
        finally:
            pipe.to(devices.cpu if hasattr(devices, "cpu") else "cpu")
            if hasattr(devices, "torch_gc"):
                devices.torch_gc()


class ScriptPostprocessingHeadsUp(scripts_postprocessing.ScriptPostprocessing):
    name = "HeadsUp"
    order = 990  # before "Upscale" (1000), so older A1111 without process_firstpass sees the settings in time

    def ui(self):
        import gradio as gr

        try:
            from modules.ui_components import InputAccordion

            accordion = InputAccordion(False, label="HeadsUp (portrait upscaler settings)")
        except Exception:  # older A1111: a plain checkbox
            accordion = None
        with (accordion if accordion is not None else gr.Group()) as enable:
            if accordion is None:
                enable = gr.Checkbox(False, label="HeadsUp: use these settings")
            reference = gr.Image(label="Reference photo of the person (optional)", type="pil")
            color_fix = gr.Dropdown(list(COLOR_FIXES), value="adain", label="Colour fix")
            tile_size = gr.Slider(0, 2048, value=0, step=64, label="Tile size (0 = automatic)")
        return {"enable": enable, "reference": reference, "color_fix": color_fix, "tile_size": tile_size}

    def process_firstpass(self, pp, enable=False, reference=None, color_fix="adain", tile_size=0):
        set_options(enable, reference, color_fix, tile_size)

    def process(self, pp, enable=False, reference=None, color_fix="adain", tile_size=0):
        set_options(enable, reference, color_fix, tile_size)
        if enable:
            pp.info["HeadsUp"] = f"colour fix {_OPTIONS['color_fix']}" + (", reference" if reference else "")
