"""fp16 / bf16 / fp32 against fp32 on the full-size SD2.1 architecture (UNet + VAE), one-step HeadsUp pipeline.

    OMP_NUM_THREADS=1 python bench/dtype.py --size 256
    python bench/dtype.py --size 1024 --device cuda

Random weights (the shipped SD2.1 configs, seed 0; conv_in widened to 9 channels as HeadsUp's), a real photo
(insightface's t1.jpg) as input, a random N(0, 1) prompt embedding. Every run uses ``HeadsUpPipeline.upscale``
untiled with the weights in the given dtype; the UNet output and the x0 update are computed in fp32 whatever the
weights' dtype (model.py). Rows: output PSNR against the fp32 output (images in 0..1), and the RMS error of x0
(the latent after the one-step update) against fp32's, which the update amplifies by sqrt(1-a)/sqrt(a) = 14.6.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as `python bench/dtype.py`: the repository root holds headsup_core
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headsup_core.eval.metrics import psnr  # noqa: E402
from headsup_core.loading.base import CONFIG_DIR  # noqa: E402
from headsup_core.loading.surgery import widen_conv_in  # noqa: E402
from headsup_core.model import HeadsUpModel  # noqa: E402
from headsup_core.pipeline import HeadsUpPipeline  # noqa: E402
from headsup_core.tiling import TilePlan  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def log(msg: str) -> None:
    print(f"[dtype {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build(dtype, device):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)  # identical random weights for every dtype
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIG_DIR / "sd2" / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIG_DIR / "sd2" / "vae"))
    widen_conv_in(unet, 9)
    embeds = torch.randn(1, 77, 1024, generator=torch.Generator().manual_seed(1))
    model = HeadsUpModel(vae.eval(), unet.eval(), prompt_embeds=embeds).requires_grad_(False)
    return HeadsUpPipeline(model.to(device=device, dtype=dtype))


def main(argv=None) -> int:
    from PIL import Image

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256, help="output side in pixels (default 256)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="fp32,fp16,bf16")
    args = ap.parse_args(argv)
    spec = importlib.util.find_spec("insightface")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "images" / "t1.jpg"
    lq = np.asarray(Image.open(path).convert("RGB").resize((args.size // 4, args.size // 4), Image.BICUBIC))
    whole = TilePlan(encoder_tile=4096, decoder_tile=4096, unet_tile=4096)
    outs, x0s = {}, {}
    for name in args.dtypes.split(","):
        pipe = build(DTYPES[name], torch.device(args.device))
        captured = {}
        orig = pipe.model.predict_x0

        def spy(*a, orig=orig, captured=captured, **k):
            captured["x0"] = orig(*a, **k).float().cpu()
            return captured["x0"]

        pipe.model.predict_x0 = spy
        t = time.time()
        outs[name] = pipe.upscale(lq, 4, color_fix="none", tile_size=whole).astype(np.float64) / 255
        x0s[name] = captured["x0"]
        log(f"{name}: {time.time() - t:.0f}s")
        del pipe
    print(f"x0 std (fp32): {float(x0s['fp32'].std()):.3f}\n")
    print("| weights dtype | output PSNR vs fp32 | x0 RMS error vs fp32 |")
    print("|---|---|---|")
    for name in outs:
        db = psnr(outs[name], outs["fp32"])
        p = "identical" if db == math.inf else f"{db:.1f} dB"
        rms = float(((x0s[name] - x0s["fp32"]) ** 2).mean().sqrt())
        print(f"| {name} | {p} | {rms:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
