"""Output PSNR of per-stage number and memory formats against the fp32 contiguous pipeline (quality, not time).

    OMP_NUM_THREADS=1 python -m bench.precision --size 512 --set file     # seed-0 LDM single file (bench/pipeline.py's)
    OMP_NUM_THREADS=1 python -m bench.precision --size 512 --set folder   # seed-1 diffusers folder + OSEDiff .pkl

Two independent weight sets of the SD2.1-size architecture with random weights: ``file``, the fp16 LDM single
file bench/pipeline.py runs (no HeadsUp weights), and ``folder``, a diffusers folder with other seeds plus an
OSEDiff-format ``.pkl`` of random LoRA adapters (rank 4). One image (a real photo crop when the insightface wheel
ships one, else noise), every stage untiled, colour fix ``adain``. Each variant changes one
thing against the fp32 contiguous baseline and reports the output PSNR (dB) against it, plus the RMS error of the
latents it produces. This is what decides the CPU defaults in ``headsup_core/perf.py`` (bf16 only for stages that
stay >= 40 dB). Peak RSS stays under ~6 GB (the fp32 UNet plus one half-precision copy of a part at a time).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/precision.py`: the repository root holds headsup_core and bench
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from headsup_core.eval.metrics import psnr  # noqa: E402

VARIANTS = ("fp32 channels_last", "encoder bf16", "decoder bf16", "vae bf16", "vae bf16 + channels_last",
            "unet bf16")


def _image(side: int):
    import numpy as np

    try:
        import importlib.resources as res

        from PIL import Image

        path = res.files("insightface") / "data" / "images" / "t1.jpg"
        img = Image.open(str(path)).convert("RGB")
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((side, side),
                                                                                               Image.BICUBIC)
        return np.asarray(img), "t1.jpg centre crop"
    except Exception:  # noqa: BLE001 - no photo: noise
        return np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8), "uniform noise"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="output side in pixels (input = size / 4)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    ap.add_argument("--set", choices=("file", "folder"), default="file",
                    help="weight set: file (seed-0 LDM single file) or folder (seed-1 diffusers folder + OSEDiff .pkl)")
    ap.add_argument("--files-dir", default=None,
                    help="where the weight sets are written once and reused (default: a folder in the temp dir)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    from bench.models import build_pipeline, default_files_dir, sd21_diffusers_set, sd21_single_file
    from headsup_core.loading.build import build_model
    from headsup_core.pipeline import HeadsUpPipeline
    from headsup_core.tiling import TilePlan

    torch.set_grad_enabled(False)
    lq, source = _image(args.size // 4)
    files = args.files_dir or default_files_dir()
    if args.set == "file":  # identical random SD2.1-size weights to bench/pipeline.py
        sd21_single_file(files, 0)
        pipe = build_pipeline("sd21", files, torch.device("cpu"), "fp32", 0, defaults=False)
    else:
        base, weights = sd21_diffusers_set(files, seed=1)
        m, info = build_model(base, weights, "cpu", "fp32", weight_dtype="fp32")
        m.to(memory_format=torch.contiguous_format)
        pipe = HeadsUpPipeline(m, info.pop("text_encoder_loader"), info)
        pipe.model.default_prompt_embeds = torch.randn(1, 77, pipe.model.cross_attention_dim,
                                                       generator=torch.Generator().manual_seed(8))
    source += f", weight set {args.set}"
    model = pipe.model
    untiled = TilePlan(encoder_tile=10**5, unet_tile=10**5, decoder_tile=10**5)
    captured = {}

    def run():
        out, info = pipe.upscale(lq, scale=4, tile_size=untiled, return_info=True)
        return torch.from_numpy(out).float() / 255, info

    hooks = []

    def capture(name):
        def hook(module, inputs, output):
            captured[name] = (output.sample if hasattr(output, "sample") else output).detach().float().clone()
        return hook

    hooks.append(model.unet.register_forward_hook(capture("eps")))
    t = time.perf_counter()
    base, _ = run()
    base_eps = captured["eps"]
    print(f"[precision] baseline fp32 contiguous {args.size}^2 in {time.perf_counter() - t:.0f} s ({source})",
          file=sys.stderr, flush=True)
    rows = []
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if name not in VARIANTS:
            ap.error(f"unknown variant {name!r}")
        parts = {"encoder bf16": [model.vae.encoder, model.vae.quant_conv],
                 "decoder bf16": [model.vae.decoder, model.vae.post_quant_conv],
                 "vae bf16": [model.vae], "vae bf16 + channels_last": [model.vae], "unet bf16": [model.unet],
                 "fp32 channels_last": []}[name]
        # bf16 rounding of the weights survives a cast back to fp32: keep the parts' fp32 weights to restore
        # them (not the UNet's, 3.5 GB: "unet bf16" runs last).
        saved = [None if p is model.unet else {k: v.clone() for k, v in p.state_dict().items()} for p in parts]
        for p in parts:
            p.to(torch.bfloat16)
        if "channels_last" in name:
            model.to(memory_format=torch.channels_last)
        t = time.perf_counter()
        out, _ = run()
        eps_rms = float(torch.sqrt(torch.mean((captured["eps"] - base_eps) ** 2)))
        row = {"variant": name, "psnr_db": round(psnr(out, base), 2), "eps_rms_err": eps_rms,
               "seconds_1_thread": round(time.perf_counter() - t, 1)}
        rows.append(row)
        print(f"[precision] {name}: {row['psnr_db']} dB (eps RMS err {eps_rms:.2e})", file=sys.stderr, flush=True)
        for p, state in zip(parts, saved):
            p.to(torch.float32)
            if state is not None:
                p.load_state_dict(state)
        model.to(memory_format=torch.contiguous_format)
    for h in hooks:
        h.remove()
    print(f"\nOutput PSNR vs fp32 contiguous, SD2.1-size random weights, {args.size}^2 output, untiled, adain "
          f"({source}):\n")
    print("| variant | PSNR dB | UNet eps RMS error |\n|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['psnr_db']} | {r['eps_rms_err']:.2e} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
