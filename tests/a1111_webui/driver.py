"""Drives the extension through a webui's own script loader, upscaler loader and Extras runner; prints JSON.

Run as ``python -I -S driver.py CONFIG_JSON`` so that neither site-packages' .pth files (an editable install of
headsup_core) nor the environment can supply ``headsup_core``: the only copy is the extension's own folder,
which the webui puts on a temporary sys.path while it loads the script. CONFIG_JSON keys:
  path_prefix: folders put first on sys.path (stand-ins, then the webui checkout; or tests/a1111_stub)
  site: site-packages folders appended (for torch, diffusers, ...; their .pth files are not run)
  root: a scratch webui root (paths.script_path) whose scripts/ holds the webui's postprocessing_upscale.py
  webui: the webui checkout (shared.script_path, for modelloader.load_upscalers)
  extension: the extension's folder, as extensions/<name>
  models: the models folder (HeadsUp/, Stable-diffusion/)
"""
import io
import json
import sys
import traceback

cfg = json.loads(sys.argv[1])
sys.path[:0] = cfg["path_prefix"]
sys.path += cfg["site"]
result = {"log": []}
out_stream, sys.stdout = sys.stdout, io.StringIO()  # webui/extension prints go to result["stdout"]


def main():
    import importlib.util
    import os

    import numpy as np
    from PIL import Image

    result["headsup_core_findable_before"] = importlib.util.find_spec("headsup_core") is not None
    from modules import extensions, paths, shared

    shared.models_path = paths.models_path = cfg["models"]
    shared.script_path, paths.script_path = cfg["webui"], cfg["root"]
    shared.cmd_opts.ckpt_dir = None
    extensions.register(cfg["extension"])
    try:
        from modules import shared_state

        shared.state = shared_state.State()
    except ImportError as err:  # the stub has no separate shared_state
        result["log"].append(f"shared_state: {err}")
    from modules import modelloader, script_callbacks, scripts, scripts_postprocessing

    syspath_before = list(sys.path)
    scripts.load_scripts()
    result["syspath_restored"] = sys.path == syspath_before
    modelloader.load_upscalers()
    script_callbacks.ui_settings_callback()
    if cfg.get("base_option"):
        shared.opts.headsup_base = cfg["base_option"]
    result["upscalers"] = [[u.name, u.scale] for u in shared.sd_upscalers]
    result["postprocessing_scripts"] = [d.script_class.__name__ for d in scripts.postprocessing_scripts_data]
    mod = next(d.module for d in scripts.postprocessing_scripts_data if d.path.endswith("headsup_a1111.py"))
    import headsup_core
    from headsup_core.pipeline import HeadsUpPipeline

    result["headsup_core_file"] = headsup_core.__file__
    result["base_choices"] = getattr(mod, "base_choices", list)()  # absent before issue 15
    result["headsup_base_option"] = getattr(shared.opts, "headsup_base", None)

    passes, do_calls = [], []
    real_upscale, real_do = HeadsUpPipeline.upscale, mod.UpscalerHeadsUp.do_upscale

    def counting_upscale(self, *a, **k):
        passes.append(k.get("color_fix"))
        return real_upscale(self, *a, **k)

    def counting_do(self, img, selected_model):
        do_calls.append(float(self.scale))
        return real_do(self, img, selected_model)

    HeadsUpPipeline.upscale, mod.UpscalerHeadsUp.do_upscale = counting_upscale, counting_do
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 48 * 40 * 3).reshape(40, 48, 3)
    image = Image.fromarray(np.clip(ramp + rng.normal(0, 25, ramp.shape), 0, 255).astype(np.uint8))
    runner = scripts.scripts_postproc
    name = next(u.name for u in shared.sd_upscalers if u.name == "HeadsUp portrait")

    def extras(upscale, headsup):
        shared.state.begin(job="extras")
        pp = scripts_postprocessing.PostprocessedImage(image.copy())
        runner.create_args_for_run({})  # builds the UI once; then the controls' defaults fill what is not given
        named = {s.name: s for s in runner.scripts_in_preferred_order()}
        given = {"Upscale": upscale, "HeadsUp": headsup}
        given = {k: {**{n: getattr(c, "value", None) for n, c in named[k].controls.items()}, **v}
                 for k, v in given.items()}
        args = runner.create_args_for_run(given)
        runner.run(pp, args)
        shared.state.end()
        n = len(passes)
        return pp.image, dict(pp.info), n

    by2 = {"upscale_mode": 0, "upscale_by": 2.0, "upscale_to_width": 0, "upscale_to_height": 0,
           "upscale_crop": False, "upscaler_1_name": name, "upscaler_2_name": "None", "upscaler_2_visibility": 0}
    hu = {"enable": True, "reference": None, "color_fix": "adain", "tile_size": 0}
    runs = {}
    a, info_a, runs["adain"] = extras(by2, hu)
    b, _, runs["adain_again"] = extras(by2, hu)
    c, info_c, runs["wavelet"] = extras(by2, dict(hu, color_fix="wavelet"))
    d, _, runs["disabled"] = extras(by2, dict(hu, enable=False))
    result["passes_after"] = runs
    result["size"] = list(a.size)
    result["info_adain"], result["info_wavelet"] = info_a, info_c
    diff = lambda x, y: float(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).mean())
    result["diff_adain_again"], result["diff_wavelet"] = diff(a, b), diff(a, c)
    result["diff_disabled_vs_wavelet"] = diff(c, d)

    n = len(passes)
    small = dict(by2, upscale_mode=1, upscale_to_width=24, upscale_to_height=24, upscale_crop=True)
    try:
        e, _, _ = extras(small, hu)
        result["scale_to_smaller"] = {"ok": True, "size": list(e.size), "passes": len(passes) - n}
    except Exception as err:  # noqa: BLE001
        result["scale_to_smaller"] = {"ok": False, "error": f"{type(err).__name__}: {err}"}

    scaler = next(u for u in shared.sd_upscalers if u.name == name)
    n, k = len(passes), len(do_calls)
    shared.state.begin(job="extras")
    shared.state.interrupt()
    out = scaler.scaler.upscale(image, 2, scaler.data_path)
    shared.state.end()
    result["interrupt"] = {"passes": len(passes) - n, "do_upscale_calls": len(do_calls) - k, "size": list(out.size)}
    shared.state.interrupted = False
    n, k = len(passes), len(do_calls)
    shared.state.begin(job="extras")
    out = scaler.scaler.upscale(image, 1, scaler.data_path)
    shared.state.end()
    result["resize_1"] = {"passes": len(passes) - n, "do_upscale_calls": len(do_calls) - k, "size": list(out.size)}
    if hasattr(mod, "forge_prepare_free_memory"):
        result["forge_free_memory"] = mod.forge_prepare_free_memory() is not None
        result["forge_free_memory_source"] = mod._FREE.get("source")
    result["ext_root_on_syspath"] = any(os.path.abspath(p) == os.path.abspath(cfg["extension"]) for p in sys.path)


try:
    main()
    result["ok"] = True
except BaseException:  # noqa: BLE001
    result["ok"] = False
    result["error"] = traceback.format_exc()
result["stdout"] = sys.stdout.getvalue()[-4000:]
sys.stdout = out_stream
print(json.dumps(result, default=str))
