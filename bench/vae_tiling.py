"""Tiled against untiled VAE on the full-size SD2.1 VAE architecture: PSNR for the exact (default) and fast modes.

    OMP_NUM_THREADS=1 python bench/vae_tiling.py --sizes 1024 --tile 64
    python bench/vae_tiling.py --sizes 1024,2048 --device cuda

Random weights (the shipped SD2.1 VAE config, seed 0); a real photo (insightface's t1.jpg, or --image) resized
to the output size. Rows:
- encoder: latent posterior mean from tiled encode vs untiled encode (PSNR over the untiled latent's range);
- decoder: image from tiled decode vs untiled decode, both of the untiled latent (PSNR, images in 0..1);
- both: tiled encode then tiled decode vs untiled encode then untiled decode.
Tiles are ``--tile`` latents (64 = 512 px) so a 1024² output is 2x2 tiles, 2048² 4x4. Modes as the pipeline runs
them: ``exact`` = ``tiled_vae.run_exact`` with the TilePlan contexts; ``fast`` = overlapping blended tiles with
preview statistics (``tiling.run_tiled`` + ``GroupNormSync``, overlap 8, the pipeline's fast-mode contexts).
An untiled 2048² pass needs ~10 GB of RAM in fp32.
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

if __package__ in (None, ""):  # run as `python bench/vae_tiling.py`: the repository root holds headsup_core
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headsup_core.eval.metrics import psnr  # noqa: E402
from headsup_core.loading.base import CONFIG_DIR  # noqa: E402
from headsup_core.tiled_vae import decoder_forward, encoder_forward, run_exact  # noqa: E402
from headsup_core.tiling import TilePlan, run_tiled  # noqa: E402

ENCODER_PREVIEW, DECODER_PREVIEW = 64, 32  # as the pipeline's fast mode


def log(msg: str) -> None:
    print(f"[vae_tiling {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def photo(path: str | None, size: int) -> torch.Tensor:
    from PIL import Image

    if path is None:
        spec = importlib.util.find_spec("insightface")
        path = str(Path(list(spec.submodule_search_locations)[0]) / "data" / "images" / "t1.jpg")
    img = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1024", help="output sides in pixels, comma separated (default 1024)")
    ap.add_argument("--tile", type=int, default=64, help="VAE tile in latents (default 64 = 512 px)")
    ap.add_argument("--image", help="photo to use (default: insightface's t1.jpg)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    from diffusers import AutoencoderKL

    dev = torch.device(args.device)
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIG_DIR / "sd2" / "vae")).eval().to(dev)
    plan = TilePlan()
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        x = photo(args.image, size).to(dev)
        lat = size // 8
        with torch.no_grad():
            t = time.time()
            z_ref = vae.quant_conv(vae.encoder(x))[:, :4]
            log(f"{size}: untiled encode {time.time() - t:.0f}s")
            t = time.time()
            y_ref = vae.decoder(vae.post_quant_conv(z_ref)).clamp(-1, 1)
            log(f"{size}: untiled decode {time.time() - t:.0f}s")
        z_peak = float(z_ref.max() - z_ref.min())

        def enc(mode, image):
            if mode == "exact":
                return run_exact(encoder_forward, vae, image, tile=args.tile, context=plan.encoder_context,
                                 in_factor=8, out_factor=1, compute_device=dev)[:, :4]
            from headsup_core.tiling import GroupNormSync  # noqa: F401  (used through run_tiled's norm_sync)

            return run_tiled(lambda t: vae.quant_conv(vae.encoder(t))[:, :4], image, tile=args.tile,
                             overlap=plan.encoder_overlap, in_factor=8, out_factor=1, out_channels=4,
                             compute_device=dev, norm_sync=vae.encoder, preview_side=ENCODER_PREVIEW,
                             context=plan.encoder_overlap)

        def dec(mode, z):
            if mode == "exact":
                out = run_exact(decoder_forward, vae, z, tile=args.tile, context=plan.decoder_context, in_factor=1,
                                out_factor=8, compute_device=dev)
            else:
                out = run_tiled(lambda t: vae.decoder(vae.post_quant_conv(t)), z, tile=args.tile,
                                overlap=plan.decoder_overlap, in_factor=1, out_factor=8, out_channels=3,
                                compute_device=dev, norm_sync=vae.decoder, preview_side=DECODER_PREVIEW,
                                context=plan.decoder_overlap // 2)
            return out.clamp(-1, 1)

        for mode in ("exact", "fast"):
            with torch.no_grad():
                t = time.time()
                z = enc(mode, x)
                y_dec = dec(mode, z_ref)
                y_both = dec(mode, z)
            n = math.ceil(lat / args.tile) ** 2
            row = (size, mode, n, psnr(z, z_ref, z_peak), psnr((y_dec + 1) / 2, (y_ref + 1) / 2, 1.0),
                   psnr((y_both + 1) / 2, (y_ref + 1) / 2, 1.0))
            rows.append(row)
            log(f"{size} {mode}: {time.time() - t:.0f}s, encoder {row[3]:.1f} dB, decoder {row[4]:.1f} dB, "
                f"both {row[5]:.1f} dB")
    print(f"| output | mode | tiles per stage ({args.tile} latents) | encoder latent PSNR | decoder PSNR | "
          "encode+decode PSNR |")
    print("|---|---|---|---|---|---|")
    for size, mode, n, pe, pd, pb in rows:
        print(f"| {size}² | {mode} | {n} | {pe:.1f} dB | {pd:.1f} dB | {pb:.1f} dB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
