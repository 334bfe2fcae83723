"""Peak RSS and time of the exact tiled SD2.1 VAE on the CPU, with and without a spill budget (issue 14).

    OMP_NUM_THREADS=2 python bench/vae_memory.py --stage decoder --side 1024 --tile 64 --budget-mb none 1024

Each configuration runs in a fresh subprocess (so each peak is its own): the full-size SD2.1 VAE
(headsup_core/configs/sd2/vae/config.json, random weights via diffusers ``AutoencoderKL.from_config``) in the
pipeline's CPU formats (channels_last; polyphase decoder upsamplers; bf16 decoder on CPUs with native bf16, else
fp32; fp32 encoder; see headsup_core/perf.py), one stage through ``tiled_vae.run_exact`` with the TilePlan
contexts. ``--budget-mb none`` keeps every parked activation in RAM (the behaviour before spilling); a number is
run_exact's ``ram_budget``.
Prints one JSON line per configuration: seconds, peak RSS of the process (ru_maxrss), RSS before the stage
(Python + torch + weights), what spilled to disk, and memory.py's estimate of the stage (unbounded and bounded).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/vae_memory.py`: the repository root holds headsup_core and bench
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.memstat import peak_rss_bytes, rss_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MB = 2**20


def run_one(stage: str, side: int, tile: int, budget_mb: float | None, formats: str) -> dict:
    """One configuration in this process."""
    import torch
    from diffusers import AutoencoderKL

    from headsup_core import memory, spill
    from headsup_core.precision import cpu_bf16_stages
    from headsup_core.tiled_vae import decoder_forward, encoder_forward, run_exact
    from headsup_core.tiling import TilePlan

    torch.set_grad_enabled(False)
    config = json.loads((ROOT / "headsup_core" / "configs" / "sd2" / "vae" / "config.json").read_text())
    vae = AutoencoderKL.from_config(config).eval().to(memory_format=torch.channels_last)
    dtypes = {"encoder": torch.float32, "decoder": torch.float32}
    if formats == "pipeline":
        try:  # perf.apply_cpu_defaults' polyphase upsamplers, where this checkout has them
            from headsup_core.upsample import patch_upsamplers

            patch_upsamplers(vae.decoder)
        except ImportError:
            pass
        for s in cpu_bf16_stages():
            if s in dtypes:
                dtypes[s] = torch.bfloat16
    vae.encoder.to(dtypes["encoder"])
    vae.quant_conv.to(dtypes["encoder"])
    vae.decoder.to(dtypes["decoder"])
    vae.post_quant_conv.to(dtypes["decoder"])
    lat = side // 8
    gen = torch.Generator().manual_seed(0)
    if stage == "decoder":
        x = torch.randn(1, 4, lat, lat, generator=gen)
    else:
        x = torch.rand(1, 3, side, side, generator=gen) * 2 - 1
    stores = []

    class Recording(spill.SpillStore):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            stores.append(self)

    spill.SpillStore = Recording
    plan = TilePlan(encoder_tile=tile, decoder_tile=tile)
    cpu, dtype = torch.device("cpu"), dtypes[stage]
    budget = None if budget_mb is None else int(budget_mb * MB)
    before = rss_bytes()
    t0 = time.perf_counter()
    if stage == "decoder":
        def fwd(v, t, park):
            return decoder_forward(v, t.to(dtype), park)
        run_exact(fwd, vae, x, tile=tile, context=plan.decoder_context, in_factor=1, out_factor=8, compute_device=cpu,
                  ram_budget=budget)
    else:
        def fwd(v, t, park):
            return encoder_forward(v, t.to(dtype), park)
        run_exact(fwd, vae, x, tile=tile, context=plan.encoder_context, in_factor=8, out_factor=1, compute_device=cpu,
                  ram_budget=budget)
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()

    class Model:  # what memory.py reads
        pass

    m = Model()
    m.vae, m.vae_scale, m.dtype, m.unet = vae, 8, torch.float32, None
    m.encoder_dtype, m.decoder_dtype = dtypes["encoder"], dtypes["decoder"]
    est = memory.stage_bytes(m, plan, (lat, lat), stage, cpu)
    parked = memory.store_bytes(m, plan, (lat, lat), stage, cpu)
    bounded = memory.tile_bytes(m, plan, (lat, lat), stage) + (parked if budget is None else min(parked, budget))
    store = stores[-1] if stores else None
    return {"stage": stage, "side": side, "tile": tile, "dtype": str(dtype).replace("torch.", ""),
            "budget_mb": budget_mb, "seconds": round(seconds, 1), "peak_rss_mb": round(peak / MB),
            "rss_before_mb": round(before / MB), "weights_mb": round(memory.weights_bytes(vae) / MB),
            "parked_ram_peak_mb": round(store.peak_ram_bytes / MB) if store else None,
            "spilled_mb": round(store.spilled_bytes / MB) if store else None,
            "spill_disk_peak_mb": round(store.peak_disk_bytes / MB) if store else None,
            "estimate_stage_mb": round(est / MB), "estimate_with_budget_mb": round(bounded / MB),
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--stage", nargs="+", choices=("decoder", "encoder"), default=["decoder"])
    ap.add_argument("--side", type=int, default=1024, help="output side in pixels (square; multiple of 8)")
    ap.add_argument("--tile", type=int, default=64, help="exact VAE tile in latents (999: untiled)")
    ap.add_argument("--budget-mb", nargs="+", default=["none", "1024"],
                    help="run_exact ram_budget per configuration, in MB, or 'none' (all in RAM)")
    ap.add_argument("--formats", choices=("pipeline", "fp32"), default="pipeline",
                    help="pipeline: the CPU defaults of headsup_core/perf.py; fp32: every stage fp32")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: run one config here
    args = ap.parse_args(argv)
    budgets = [None if str(b).lower() == "none" else float(b) for b in args.budget_mb]
    if args.one:
        print(json.dumps(run_one(args.stage[0], args.side, args.tile, budgets[0], args.formats)), flush=True)
        return 0
    print(json.dumps({"load_average": os.getloadavg(), "cpus": os.cpu_count(),
                      "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}), flush=True)
    status = 0
    for stage in args.stage:
        for b in args.budget_mb:
            cmd = [sys.executable, __file__, "--one", "--stage", stage, "--side", str(args.side), "--tile",
                   str(args.tile), "--budget-mb", str(b), "--formats", args.formats]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                status = 1
                print(json.dumps({"stage": stage, "budget_mb": b, "error": proc.stderr.strip()[-2000:]}), flush=True)
            else:
                print(lines[-1], flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
