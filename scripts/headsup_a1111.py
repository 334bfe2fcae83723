"""HeadsUp for AUTOMATIC1111 stable-diffusion-webui and Forge (this repository cloned into ``extensions/``).

- ``UpscalerHeadsUp``: one upscaler entry per weights file (``.safetensors`` HeadsUp checkpoint or OSEDiff
  ``.pkl``) in ``models/HeadsUp``, so HeadsUp shows up in the Extras tab and the hires-fix upscaler lists.
- ``ScriptPostprocessingHeadsUp``: an Extras section with a reference photo, the colour fix and the tile size;
  its settings apply to HeadsUp upscalers chosen in the same Extras run.

The base model (SD 2.x architecture) is the setting "HeadsUp base model" (Settings → Upscaling), which lists the
SD 2.x ``.safetensors`` files in the webui's ``models/Stable-diffusion``; on "Automatic" it is ``$HEADSUP_BASE``,
else ``models/HeadsUp/base`` (a diffusers folder) or ``models/HeadsUp/base.safetensors``/``.ckpt``. Face analysis
(for references and face masks) is ``auto``, as in the CLI and ComfyUI: an insightface pack in
``models/insightface/models/<pack>/``, else dlib, else facexlib weights in ``models/facedetection``.

Run against the real webui code (tests/test_a1111_webui.py) of AUTOMATIC1111 v1.8.0 (bef51aed032c),
lllyasviel/stable-diffusion-webui-forge dfdcbab6 and 04c6ab68 ("1.10.1", pre-rewrite Forge), and
Haoming02/sd-webui-forge-classic 1f95d717.
All model work is ``headsup_core.HeadsUpPipeline``, the same code as the CLI and the ComfyUI nodes.
"""
from __future__ import annotations

import hashlib
import os
import sys

# A1111's load_scripts puts the extension folder on a *temporary* sys.path list while it imports this file and
# then restores the old list, so an appended path is lost. Import the package now, while the folder is on the
# path: later `headsup_core.*` imports resolve through the imported package itself.
_EXT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _EXT_ROOT not in sys.path:
    sys.path.insert(0, _EXT_ROOT)
import headsup_core
from headsup_core import errors as hu_errors
from headsup_core.choices import COLOR_FIX_MODES
from headsup_core.loading.base import is_sd2_file
from headsup_core.loading.stream import SingleFile

if os.path.dirname(os.path.dirname(os.path.abspath(headsup_core.__file__))) != _EXT_ROOT:
    print(f"HeadsUp: using headsup_core from {os.path.dirname(headsup_core.__file__)}, not this extension's copy")

from modules import devices, scripts_postprocessing, shared
from modules import upscaler as _upscaler  # a module import: the base classes are not re-registered

WEIGHTS_EXTS = (".safetensors", ".pkl")
BASE_STEMS = ("base",)
DEFAULT_SCALE = 4  # OSEDiff, and so HeadsUp's initialisation, is trained for 4x
AUTOMATIC = "Automatic"
SD_PREFIX = "Stable-diffusion/"
_DEFAULTS = {"reference": None, "color_fix": "adain", "tile_size": 0, "stamp": None}
_OPTIONS = dict(_DEFAULTS)  # set by the Extras section for the current job
_CACHE: dict = {}  # (base, weights) -> pipeline; one at a time, kept on the CPU between runs
_ANALYZER: dict = {}
_FREE: dict = {}  # the Forge variant's prepare_free_memory, found once
_TAGGER: dict = {}  # the DAPE tagger of the "HeadsUp tags" setting
_LAST_SETTINGS: list = [None]  # what the Extras section last ran with


def models_dir() -> str:
    return os.path.join(shared.models_path, "HeadsUp")


def sd_models_dir() -> str:
    ckpt_dir = getattr(getattr(shared, "cmd_opts", None), "ckpt_dir", None)
    return ckpt_dir or os.path.join(shared.models_path, "Stable-diffusion")


def find_weights(folder: str | None) -> list[str]:
    """Weights files directly in ``folder`` (the base model's files are not weights)."""
    if not folder or not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(WEIGHTS_EXTS) and os.path.splitext(f)[0].lower() not in BASE_STEMS
                  and os.path.isfile(os.path.join(folder, f)))


def base_choices() -> list[str]:
    """Values of the "HeadsUp base model" setting: Automatic, then the SD 2.x files in models/Stable-diffusion."""
    root, found = sd_models_dir(), []
    if os.path.isdir(root):
        for folder, _, files in os.walk(root, followlinks=True):
            for f in files:
                path = os.path.join(folder, f)
                if f.lower().endswith(".safetensors") and is_sd2_file(path):
                    found.append(SD_PREFIX + os.path.relpath(path, root).replace(os.sep, "/"))
    return [AUTOMATIC] + sorted(found)


def _base_setting() -> str:
    return getattr(getattr(shared, "opts", None), "headsup_base", None) or AUTOMATIC


def find_base(folder: str) -> str:
    """The base model: the webui setting, else $HEADSUP_BASE, else models/HeadsUp/base*."""
    from headsup_core.errors import MissingModelError

    choice = _base_setting()
    if choice != AUTOMATIC:
        path = os.path.join(sd_models_dir(), choice[len(SD_PREFIX):]) if choice.startswith(SD_PREFIX) else choice
        if not os.path.exists(path):
            raise MissingModelError(f"The HeadsUp base model setting names {path}, which does not exist: pick "
                                    "another in Settings → Upscaling → HeadsUp base model.")
        return path
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
    sd2 = base_choices()[1:]
    hint = (f" SD 2.x files found in {sd_models_dir()}: {', '.join(c[len(SD_PREFIX):] for c in sd2)}; choose one"
            if sd2 else f" Or put an SD 2.1-base .safetensors in {sd_models_dir()} and choose it")
    raise MissingModelError(
        f"HeadsUp needs its SD 2.1-base model: put a diffusers folder at {candidates[0]} or a single file at "
        f"{candidates[1]} (or set HEADSUP_BASE).{hint} in Settings → Upscaling → HeadsUp base model.")


def weights_scale(path: str) -> int:
    """The scale a weights file was trained for: its ``scale`` metadata if recorded, else OSEDiff's 4x."""
    if path.lower().endswith(".safetensors"):
        try:
            meta = SingleFile(path).metadata
        except hu_errors.WeightsError:
            meta = {}
        for key in ("scale", "train_scale"):
            try:
                return max(1, int(float(meta[key])))
            except (KeyError, ValueError, TypeError):
                continue
    return DEFAULT_SCALE


def _device_dtype():
    """A1111's device, and the compute dtype precision.py picks for it (fp16 on a GPU, fp32 with --no-half, the
    CPU's per-stage policy on a CPU: ``None``)."""
    import torch
    from headsup_core.precision import host_dtype

    dev = getattr(devices, "device", None)
    if dev is None and hasattr(devices, "get_optimal_device"):
        dev = devices.get_optimal_device()
    dev = torch.device(dev or "cpu")
    no_half = bool(getattr(getattr(shared, "cmd_opts", None), "no_half", False))
    return dev, host_dtype(None, dev, no_half=no_half)


def forge_prepare_free_memory():
    """Forge's ``prepare_free_memory`` (``modules_forge/utils.py`` in Forge, ``forge_util.py`` in Forge Classic),
    or None on A1111. Looked up once; which one was found is printed."""
    if "fn" not in _FREE:
        import importlib
        import importlib.util

        _FREE.update(fn=None, source=None)
        try:
            is_forge = importlib.util.find_spec("modules_forge") is not None
        except (ImportError, ValueError):
            is_forge = False
        failures = []
        for name in ("modules_forge.utils", "modules_forge.forge_util") if is_forge else ():
            try:
                fn = getattr(importlib.import_module(name), "prepare_free_memory", None)
            except Exception as err:  # noqa: BLE001 - a broken Forge module must not break the upscale
                failures.append(f"{name}: {type(err).__name__}: {err}")
                continue
            if callable(fn):
                _FREE.update(fn=fn, source=f"{name}.prepare_free_memory")
                print(f"HeadsUp: frees VRAM through Forge's {_FREE['source']}")
                break
            failures.append(f"{name}: no prepare_free_memory")
        if is_forge and _FREE["fn"] is None:
            print("HeadsUp: WARNING: this is Forge, but its prepare_free_memory was not found "
                  f"({'; '.join(failures)}); Forge's models stay in VRAM while HeadsUp runs.")
    return _FREE["fn"]


def _free_memory() -> None:
    """Forge manages VRAM itself: ask it for room first. Classic A1111: empty the cache."""
    fn = forge_prepare_free_memory()
    if fn is not None:
        fn()
        return
    if hasattr(devices, "torch_gc"):
        devices.torch_gc()


def _job_stamp():
    return getattr(getattr(shared, "state", None), "job_timestamp", None)


def set_options(enable=False, reference=None, color_fix="adain", tile_size=0) -> None:
    _OPTIONS.clear()
    _OPTIONS.update(_DEFAULTS)
    if enable:
        _OPTIONS.update(reference=reference, color_fix=color_fix if color_fix in COLOR_FIX_MODES else "adain",
                        tile_size=int(tile_size or 0), stamp=_job_stamp())


def current_options() -> dict:
    """The Extras section's settings if they were set in this job, else the defaults (e.g. in hires fix)."""
    return dict(_OPTIONS) if _OPTIONS["stamp"] is not None and _OPTIONS["stamp"] == _job_stamp() else dict(_DEFAULTS)


def _image_digest(image) -> str | None:
    if image is None:
        return None
    try:
        return f"{image.mode}{image.size}" + hashlib.sha1(image.tobytes()).hexdigest()
    except Exception:  # noqa: BLE001 - not a PIL image: compare by identity
        return f"id{id(image)}"


def settings_signature(enable=False, reference=None, color_fix="adain", tile_size=0) -> tuple:
    """Everything besides the Upscale section's own inputs that changes a HeadsUp result."""
    if not enable:
        return (False, _base_setting())
    return (True, _image_digest(reference), color_fix, int(tile_size or 0), _base_setting())


def invalidate_extras_cache_if_changed(signature: tuple) -> bool:
    """The webui's Upscale section caches results by image, upscaler and size only, so a change of HeadsUp's
    settings would return the old picture: clear that cache (``scripts_postproc.image_changed()``) on a change."""
    if _LAST_SETTINGS[0] == signature:
        return False
    first, _LAST_SETTINGS[0] = _LAST_SETTINGS[0] is None, signature
    try:
        from modules import scripts

        runner = getattr(scripts, "scripts_postproc", None)
        if runner is not None:
            runner.image_changed()
    except Exception as err:  # noqa: BLE001
        print(f"HeadsUp: could not clear the Extras upscale cache ({err}); change the image to force a new run.")
        return False
    return not first


def face_analyzer(required: bool):
    """Face analysis chosen as in the CLI and ComfyUI (``auto``): an insightface pack in models/insightface, else
    dlib (installed with the pack), else facexlib weights in models/facedetection; None (said once) if none."""
    from headsup_core.faces.analyzer import choose_face_analyzer

    def choose(required: bool):
        return choose_face_analyzer("auto", insightface_root=os.path.join(shared.models_path, "insightface"),
                                    facexlib_root=os.path.join(shared.models_path, "facedetection"),
                                    device=str(_device_dtype()[0]), required=required)

    if "value" not in _ANALYZER:
        _ANALYZER["value"] = choose(required=False)
        found = _ANALYZER["value"]
        print(f"HeadsUp: faces: {found.auto_note}" if found else "HeadsUp: no face analyzer, faces get no special "
              "treatment.")
    if required and _ANALYZER["value"] is None:
        choose(required=True)  # raises the core's sentence on what to install
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
                self.scalers.append(_upscaler.UpscalerData(f"HeadsUp {stem}", path, self, weights_scale(path)))

    def load_model(self, path: str):
        from headsup_core import HeadsUpPipeline

        dev, dtype = _device_dtype()
        key = (find_base(self.model_path), path, str(dev), str(dtype))
        if key not in _CACHE:
            _CACHE.clear()  # one pipeline at a time
            # built on the CPU (A1111 moves it per run) with the precision of the device that will run it
            _CACHE[key] = HeadsUpPipeline.from_files(key[0], weights=path, device="cpu", dtype=dtype,
                                                     compute_device=dev)
        return _CACHE[key]

    def do_upscale(self, img, selected_model):
        # Forge Classic calls this before checking sizes (also for "Scale to" a smaller size), up to 4 times and
        # without an interrupt check; Forge and A1111 1.9+ call it once at scale 1. None of these is a pass.
        if float(self.scale) <= 1 or _interrupted():
            return img
        opts = current_options()
        pipe = self.load_model(selected_model)
        reference, used = opts["reference"], pipe.conditioning_in_use()
        if reference is not None and not used["reference"]:
            # weights whose reference channels were never trained (OSEDiff): say so once, skip the reference work
            if not getattr(pipe, "_a1111_said_unused", False):
                pipe._a1111_said_unused = True
                print(f"HeadsUp: the reference is ignored: {pipe.note_reference_unused()}.")
            reference = None
        analyzer = (face_analyzer(required=reference is not None)
                    if used["mask"] or reference is not None else None)
        state = getattr(shared, "state", None)

        def progress(done, total):
            if state is not None and hasattr(state, "sampling_steps"):
                state.sampling_steps, state.sampling_step = total, done

        from headsup_core.runner import upscale_with_retry

        _free_memory()
        pipe.to(*_device_dtype())
        try:
            # The core's memory policy: tiles from the budget (0 = automatic), halved and retried on OOM.
            return upscale_with_retry(pipe, img.convert("RGB"), scale=self.scale, reference=reference,
                                      face_analyzer=analyzer, tile_size=opts["tile_size"] or None,
                                      color_fix=opts["color_fix"], progress=progress, interrupt=_interrupted,
                                      tag_source=tag_source())
        except hu_errors.InterruptedByUser:
            # The core's interrupt -> A1111's convention (an interrupted step hands its input on), said once.
            print("HeadsUp: interrupted by the user; the image is passed on unscaled.")
            return img
        finally:
            pipe.to(devices.cpu if hasattr(devices, "cpu") else "cpu")
            if hasattr(devices, "torch_gc"):
                devices.torch_gc()


def tag_source():
    """The setting "HeadsUp tags": None, or the DAPE/RAM tagger reading models/HeadsUp/ram/ (cached, on the CPU)."""
    mode = getattr(getattr(shared, "opts", None), "headsup_tags", "none") or "none"
    if mode == "none":
        return None
    if _TAGGER.get("key") != (mode, models_dir()):
        from headsup_core.tags import DapeTagger

        _TAGGER.update(key=(mode, models_dir()), tagger=DapeTagger(models_dir(), use_dape=mode == "dape",
                                                                    device="cpu"))
    return _TAGGER["tagger"]


class ScriptPostprocessingHeadsUp(scripts_postprocessing.ScriptPostprocessing):
    name = "HeadsUp"
    order = 990  # before "Upscale" (1000), so older A1111 without process_firstpass sees the settings in time

    def ui(self):
        import gradio as gr

        try:
            from modules.ui_components import InputAccordion

            accordion = InputAccordion(False, label="HeadsUp (portrait upscaler settings)")
        except Exception:  # noqa: BLE001 - older A1111: a plain checkbox
            accordion = None
        with (accordion if accordion is not None else gr.Group()) as enable:
            if accordion is None:
                enable = gr.Checkbox(False, label="HeadsUp: use these settings")
            reference = gr.Image(label="Reference photo of the person (optional)", type="pil")
            color_fix = gr.Dropdown(list(COLOR_FIX_MODES), value="adain", label="Colour fix")
            tile_size = gr.Slider(0, 2048, value=0, step=64, label="Tile size (0 = automatic)")
        return {"enable": enable, "reference": reference, "color_fix": color_fix, "tile_size": tile_size}

    def process_firstpass(self, pp, enable=False, reference=None, color_fix="adain", tile_size=0):
        set_options(enable, reference, color_fix, tile_size)
        invalidate_extras_cache_if_changed(settings_signature(enable, reference, color_fix, tile_size))

    def process(self, pp, enable=False, reference=None, color_fix="adain", tile_size=0):
        set_options(enable, reference, color_fix, tile_size)
        # older webuis have no process_firstpass; order 990 runs this before the Upscale section
        invalidate_extras_cache_if_changed(settings_signature(enable, reference, color_fix, tile_size))
        if enable:
            pp.info["HeadsUp"] = f"colour fix {_OPTIONS['color_fix']}" + (", reference" if reference else "")


def on_ui_settings():
    import gradio as gr

    section = ("upscaling", "Upscaling")
    shared.opts.add_option("headsup_base", shared.OptionInfo(
        AUTOMATIC, "HeadsUp base model (SD 2.x; Automatic = models/HeadsUp/base* or $HEADSUP_BASE)",
        gr.Dropdown, lambda: {"choices": base_choices()}, section=section))
    shared.opts.add_option("headsup_tags", shared.OptionInfo(
        "none", "HeadsUp tags in the prompt (OSEDiff's DAPE; files in models/HeadsUp/ram/)", gr.Radio,
        {"choices": ["none", "dape", "ram"]}, section=section))


try:
    from modules import script_callbacks

    script_callbacks.on_ui_settings(on_ui_settings)
except Exception as _err:  # noqa: BLE001 - the upscaler works without the setting
    print(f"HeadsUp: the base model setting is unavailable here ({_err}); using models/HeadsUp/base*.")
