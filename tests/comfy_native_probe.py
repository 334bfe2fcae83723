"""Run by tests/test_comfyui_e2e.py with ComfyUI's interpreter, inside a ComfyUI checkout (its cwd): the
HeadsUpPatchModel backend on ComfyUI's own checkpoint loader and VAE modules, with only the VAE tiled.

    python comfy_native_probe.py BASE.safetensors WEIGHTS.safetensors IMAGE.png

Upscales IMAGE x2 on the CPU with the UNet untiled, on the native backend and on the HeadsUpLoader (diffusers)
backend, each with 3x3 exact VAE tiles of 8 latents and untiled; then runs the VAE stages alone (encode and
decode, float output) the same ways. Prints one JSON line: the plans' VAE modes and tile counts, PSNR (dB) of
tiled vs untiled, and the largest differences (grey levels) between the two backends.
"""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

PACK_DIR = Path(__file__).resolve().parents[1]


def _comfy_on_cpu():
    sys.path.insert(0, ".")  # the ComfyUI checkout
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management reads it: compare with the loader path on the same device


def _comfy_model_module():
    """The pack's nodes/comfy_model.py alone (the pack's ``nodes`` package would shadow ComfyUI's nodes.py)."""
    spec = importlib.util.spec_from_file_location("headsup_comfy_model", PACK_DIR / "nodes" / "comfy_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _psnr(a, b):
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def main(base, weights, image):
    _comfy_on_cpu()
    sys.path.insert(0, str(PACK_DIR))
    import comfy.sd
    import torch
    from PIL import Image

    from headsup_core.geometry import latent_size
    from headsup_core.loading.weights import load_weights
    from headsup_core.model import conditioning_in_use
    from headsup_core.pipeline import HeadsUpPipeline
    from headsup_core.tiling import TilePlan

    cm = _comfy_model_module()
    model, _clip, vae = comfy.sd.load_checkpoint_guess_config(base, output_vae=True, output_clip=False)[:3]
    loaded = load_weights(weights)
    patched_model, patched_vae = cm.patch_models(model, vae, loaded)
    native = HeadsUpPipeline(cm.ComfyHeadsUpModel(
        patched_model, patched_vae, in_channels=max(4, loaded.in_channels), prompt_embeds=loaded.prompt_embeds,
        timestep=loaded.timestep, metadata=loaded.metadata,
        conditioning=conditioning_in_use(cm.conv_in_of(loaded.unet_state)[0])), None, {"base": "graph"})
    loader = HeadsUpPipeline.from_files(base, weights, device="cpu", dtype=torch.float32)
    lq = np.asarray(Image.open(image).convert("RGB"))
    tiled = TilePlan(encoder_tile=8, decoder_tile=8, unet_tile=512)
    whole = TilePlan(encoder_tile=512, decoder_tile=512, unet_tile=512)
    runs, plans = {}, {}
    for name, pipe, tiles in (("native_tiled", native, tiled), ("native_untiled", native, whole),
                              ("loader_tiled", loader, tiled), ("loader_untiled", loader, whole)):
        runs[name], info = pipe.upscale(lq, 2, tile_size=tiles, color_fix="adain", return_info=True)
        latent_hw = latent_size(info["output_size"], pipe.model.pixel_multiple, pipe.model.vae_scale)
        plans[name] = {"vae_mode": info["tile_plan"].vae_mode,
                       "decoder_tiles": info["tile_plan"].tile_count("decoder", latent_hw)}
    a, b, c, d = (runs[k].astype(np.int16) for k in ("native_tiled", "native_untiled", "loader_tiled",
                                                      "loader_untiled"))
    vae = _vae_round_trips(native.model, loader.model, lq, tiled, whole)
    print(json.dumps({"plans": plans, "shape": list(a.shape), "std": float(a.std()),
                      "psnr_tiled_vs_untiled": _psnr(a, b), "loader_psnr_tiled_vs_untiled": _psnr(c, d),
                      "max_diff_vs_loader": int(np.abs(a - c).max()), "untiled_max_diff_vs_loader":
                      int(np.abs(b - d).max()), "max_diff_tiled_vs_untiled": int(np.abs(a - b).max()), **vae}))


def _vae_round_trips(native, loader, lq, tiled, whole):
    """The VAE stages alone (the engine's stages.encode / stages.decode, float output) on the image resized to
    the padded output size: native tiled vs untiled (dB), native tiled vs the loader's tiled (grey levels)."""
    import torch
    import torch.nn.functional as F

    from headsup_core import stages
    from headsup_core.options import UpscaleOptions
    from headsup_core.planner import plan_request

    h, w = (-(-2 * s // native.pixel_multiple) * native.pixel_multiple for s in lq.shape[:2])
    x = F.interpolate(torch.tensor(lq).permute(2, 0, 1)[None].float() / 127.5 - 1, size=(h, w), mode="bicubic")
    out = {}
    for name, model, tiles in (("native_tiled", native, tiled), ("native_untiled", native, whole),
                               ("loader_tiled", loader, tiled)):
        plan = plan_request(model, (h, w), UpscaleOptions(scale=1.0, tile_size=tiles), torch.device("cpu"))
        latent = stages.encode(model, x.clamp(-1, 1), plan, lambda: None)
        out[name] = stages.decode(model, latent, plan, lambda: None).clamp(-1, 1)
    mse = (((out["native_tiled"] - out["native_untiled"]) / 2) ** 2).mean().item()
    return {"vae_psnr_tiled_vs_untiled": float(10 * np.log10(1 / max(mse, 1e-30))),
            "vae_max_diff_vs_loader": float((out["native_tiled"] - out["loader_tiled"]).abs().max() * 127.5)}


if __name__ == "__main__":
    main(*sys.argv[1:4])
