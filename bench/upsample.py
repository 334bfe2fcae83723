"""Nearest-x2 + 3x3 conv upsampler: diffusers' forward against the polyphase one (headsup_core/upsample.py).

    OMP_NUM_THREADS=2 python bench/upsample.py                  # the SD2.1 VAE decoder's 3 upsamplers at 512² out
    OMP_NUM_THREADS=2 python bench/upsample.py --shapes 1280:16 640:32 --decode 0   # other (channels:low-res side)
    OMP_NUM_THREADS=2 python bench/upsample.py --shapes --decode 256  # only one whole decoder decode, 256² out

Random weights on the full-size SD2.1 VAE config (headsup_core/configs/sd2/vae/config.json), CPU, batch 1,
channels_last unless --contiguous. Each timing is the median of --repeats runs after one warm-up. Prints a table:
milliseconds, speed-up, and the max |difference| relative to the max |output| of the original.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch


def decoder_upsampler_shapes(vae, side: int) -> list[tuple[int, int]]:
    """(channels, low-res side) of each decoder upsampler for a ``side``² output."""
    shapes, h = [], side // 8
    for block in vae.decoder.up_blocks:
        for up in block.upsamplers or []:
            shapes.append((up.channels, h))
            h *= 2
    return shapes


def median_ms(fn, repeats: int, *args) -> float:
    fn(*args)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.float(), out.float()
    return float((ref - out).abs().max() / ref.abs().max().clamp_min(1e-12))


def main(argv=None):
    head, _, rest = __doc__.partition("\n\n")
    ap = argparse.ArgumentParser(description=head, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest)
    ap.add_argument("--side", type=int, default=512, help="output side whose decoder upsampler shapes to time")
    ap.add_argument("--shapes", nargs="*", default=None, metavar="C:H",
                    help="channels:low-res side pairs instead of the decoder's (empty: no single-layer timings)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode", type=int, default=0, metavar="SIDE",
                    help="also time one whole decode (post_quant_conv + decoder) at this output side; 0: off")
    ap.add_argument("--contiguous", action="store_true", help="contiguous instead of channels_last")
    args = ap.parse_args(argv)

    from diffusers import AutoencoderKL
    from diffusers.models.upsampling import Upsample2D

    from headsup_core.loading.base import CONFIG_DIR
    from headsup_core.upsample import patch_upsamplers, unpatch_upsamplers

    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    cfg = json.loads((CONFIG_DIR / "sd2" / "vae" / "config.json").read_text())
    vae = AutoencoderKL.from_config(cfg).eval()
    fmt = torch.contiguous_format if args.contiguous else torch.channels_last
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    shapes = (decoder_upsampler_shapes(vae, args.side) if args.shapes is None
              else [tuple(int(v) for v in s.split(":")) for s in args.shapes])
    print(f"threads {torch.get_num_threads()}, {'contiguous' if args.contiguous else 'channels_last'}, "
          f"median of {args.repeats}")
    print(f"{'what':<26}{'dtype':<7}{'original ms':>12}{'polyphase ms':>14}{'speed-up':>10}{'rel err':>10}")

    def row(what, name, t_ref, t_new, err):
        print(f"{what:<26}{name:<7}{t_ref:>12.1f}{t_new:>14.1f}{t_ref / t_new:>9.2f}x{err:>10.1e}", flush=True)

    ups = {up.channels: up for up in vae.decoder.modules() if isinstance(up, Upsample2D)}
    for c, h in shapes:
        base = ups.get(c) or Upsample2D(c, use_conv=True)
        for name in args.dtypes.split(","):
            ref = copy.deepcopy(base).to(dtypes[name]).to(memory_format=fmt)
            new = copy.deepcopy(ref)
            patch_upsamplers(new)
            x = torch.randn(1, c, h, h).to(dtypes[name]).contiguous(memory_format=fmt)
            t_ref, t_new = median_ms(ref, args.repeats, x), median_ms(new, args.repeats, x)
            row(f"upsampler {c}ch {h}->{2 * h}", name, t_ref, t_new, rel_err(ref(x), new(x)))
            del ref, new, x
    if args.decode:
        z = torch.randn(1, cfg["latent_channels"], args.decode // 8, args.decode // 8)
        for name in args.dtypes.split(","):
            vae.to(dtypes[name]).to(memory_format=fmt)
            zz = z.to(dtypes[name]).contiguous(memory_format=fmt)
            t_ref = median_ms(vae.decode, args.repeats, zz)
            ref = vae.decode(zz).sample
            patch_upsamplers(vae)
            t_new = median_ms(vae.decode, args.repeats, zz)
            row(f"decode {args.decode}² out", name, t_ref, t_new, rel_err(ref, vae.decode(zz).sample))
            unpatch_upsamplers(vae)


if __name__ == "__main__":
    main()
