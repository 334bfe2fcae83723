"""Seconds per output megapixel, per-stage times and peak memory of HeadsUpPipeline vs an OSEDiff-style path.

    OMP_NUM_THREADS=2 python bench/pipeline.py --model tiny --sizes 1K,2K,4K
    OMP_NUM_THREADS=2 python bench/pipeline.py --model sd21 --sizes 512,1024 --repeats 1
    python bench/pipeline.py --model sd21 --device cuda --dtypes fp16,bf16 --sizes 1K,2K,4K [--compile]

Each (model, size, path) runs in a fresh subprocess, so the peak memory is that configuration's own: the
process's peak RSS on the CPU (it includes the model weights), the peak allocated memory on a GPU.

Paths, on identical weights (every worker builds them from the same seed):
- ``full``: ours in fp32, contiguous, every stage untiled: the quality reference. Its output is saved and every
  other row of the same size prints its output PSNR against it;
- ``ours``: ``HeadsUpPipeline.upscale`` with the defaults (tiles from the memory budget, the measured per-stage
  formats of headsup_core/perf.py on CPU), once per ``--dtypes`` entry; ``--compile`` wraps the UNet in
  ``torch.compile`` (off by default); attention is PyTorch SDPA (diffusers' AttnProcessor2_0, named per row);
- ``ref``: OSEDiff's inference scheme (DESIGN §1 step 7) in fp32, contiguous: untiled VAE encode of the whole
  bicubic-upscaled image, the UNet over latent tiles of 96 overlapping by 32 blended with Gaussian weights,
  untiled VAE decode.
When an untiled path would not fit in memory (untiled VAE at large sizes) it is reported as skipped/OOM.

``sd21`` is the SD2.1-size architecture with seeded random weights, written once as an fp16 LDM single file and
loaded from it like a user's file (bench/models.py); ``tiny`` is the ``make-tiny`` model. Timings are for the
one-step model, no faces.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/pipeline.py`: the repository root holds headsup_core and bench
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.memstat import available_bytes, rss_bytes  # noqa: E402
from bench.models import build_pipeline, default_files_dir, sd21_diffusers_set, sd21_single_file  # noqa: E402
from bench.report import code_version, fmt, format_table  # noqa: E402
from headsup_core.eval.metrics import psnr  # noqa: E402

NAMED_SIZES = {"1K": (1024, 1024), "2K": (2048, 2048), "4K": (3840, 2160), "FHD": (1920, 1080)}
SCALE = 4
RESULT_TAG = "BENCH_RESULT "
# Rough peak of an untiled VAE pass: a handful of full-resolution activations (128 channels for SD) at once.
UNTILED_VAE_ACTIVATIONS = 6


def parse_size(text: str) -> tuple[int, int]:
    """'1K' / '2K' / '4K' / 'FHD', 'N' (NxN) or 'WxH' -> (width, height); sides must be multiples of the scale."""
    text = text.strip()
    if text.upper() in NAMED_SIZES:
        return NAMED_SIZES[text.upper()]
    parts = text.lower().split("x")
    try:
        w, h = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use 1K, 2K, 4K, FHD, N or WxH") from None
    if w <= 0 or h <= 0 or w % SCALE or h % SCALE:
        raise argparse.ArgumentTypeError(f"size {text!r}: both sides must be positive multiples of {SCALE}")
    return w, h


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- worker side
def untiled_plan():
    from headsup_core.tiling import TilePlan

    return TilePlan(encoder_tile=10**5, unet_tile=10**5, decoder_tile=10**5)


def pipe_options(job: dict, untiled):
    from headsup_core.options import UpscaleOptions

    ours = job["path"] == "ours"
    return UpscaleOptions(scale=job.get("scale", SCALE), tile_size=job["tile_size"] if ours else untiled,
                          memory_budget_mb=job.get("memory_budget_mb") if ours else None)


def _pad(x, multiple: int):
    import torch.nn.functional as F

    ph, pw = (-x.shape[-2]) % multiple, (-x.shape[-1]) % multiple
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


def _gauss(n: int, var: float = 0.01):
    import torch

    x = torch.arange(n, dtype=torch.float32)
    return torch.exp(-((x - (n - 1) / 2) ** 2) / (n * n) / (2 * var))


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    # Step by (tile - overlap) from 0; the last tile is pushed back to end exactly at the border.
    starts, pos = [], 0
    while True:
        if pos + tile >= length:
            starts.append(length - tile)
            return starts
        starts.append(pos)
        pos += tile - overlap


def reference_upscale(model, lq, out_hw, embeds, tile: int = 96, overlap: int = 32, tick=None):
    """OSEDiff-style inference on ``model``'s weights: untiled encode, tiled UNet, untiled decode. -> (img, timings)"""
    import torch
    import torch.nn.functional as F

    from headsup_core import devices
    from headsup_core.color import apply_color_fix
    from headsup_core.model import assemble_unet_input

    dev, (oh, ow) = model.device, out_hw
    t0 = time.perf_counter()
    up = F.interpolate(lq, size=(oh, ow), mode="bicubic", align_corners=False).clamp_(0, 1)
    x = _pad(up, model.vae_scale) * 2 - 1  # OSEDiff only needs whole latents
    z = model.encode(x.to(dev))
    devices.synchronize(dev)
    t1 = time.perf_counter()
    unet_in = assemble_unet_input(z, None, None, model.in_channels)
    h, w = z.shape[-2:]
    if h <= tile and w <= tile:
        x0 = model.predict_x0(unet_in, z, embeds)
    else:
        th, tw = min(tile, h), min(tile, w)
        weight = (_gauss(th)[:, None] * _gauss(tw)[None, :]).to(dev)
        acc = torch.zeros(1, 4, h, w, device=dev)
        norm = torch.zeros(1, 1, h, w, device=dev)
        ys, xs = _starts(h, th, overlap), _starts(w, tw, overlap)
        for i, y in enumerate(ys):
            for j, x_ in enumerate(xs):
                t_in = unet_in[..., y:y + th, x_:x_ + tw]
                acc[..., y:y + th, x_:x_ + tw] += model.predict_x0(t_in, t_in[:, :4], embeds).float() * weight
                norm[..., y:y + th, x_:x_ + tw] += weight
                if tick:
                    tick(i * len(xs) + j + 1, len(ys) * len(xs))
        x0 = acc / norm
    devices.synchronize(dev)
    t2 = time.perf_counter()
    y = model.decode(x0).float().cpu()
    t3 = time.perf_counter()
    out = apply_color_fix(((y[..., :oh, :ow] + 1) / 2).clamp_(0, 1), up, "adain")
    return out, {"encode_s": t1 - t0, "unet_s": t2 - t1, "decode_s": t3 - t2}


def _is_oom(exc: BaseException) -> bool:
    from headsup_core import devices

    text = str(exc).lower()
    return isinstance(exc, devices.OOM_ERRORS + (MemoryError,)) or "can't allocate memory" in text \
        or "out of memory" in text


def worker(job: dict) -> dict:
    import numpy as np
    import torch

    from headsup_core import devices, precision

    dev = devices.pick_device(job["device"])
    ours = job["path"] == "ours"
    dtype = precision.pick_dtype(job["dtype"], dev) if ours else torch.float32  # full and ref: fp32
    w, h = job["size"]
    res = {k: job[k] for k in ("model", "path", "size")}
    res.update(device=str(dev), dtype=str(dtype).replace("torch.", ""), threads=torch.get_num_threads(),
               code=code_version())
    t = time.perf_counter()
    pipe = build_pipeline(job["model"], job["files"], dev, job["dtype"], job["seed"], defaults=ours,
                          weight_dtype=job.get("weight_dtype", "auto"))
    if ours and job.get("compile"):
        from headsup_core.perf import compile_unet

        compile_unet(pipe.model, **job.get("compile_kwargs", {}))
    procs = getattr(pipe.model.unet, "attn_processors", {}) or {}
    res["attention"] = sorted({type(p).__name__ for p in procs.values()}) or ["?"]
    res["formats"] = {"unet": str(pipe.model.dtype).replace("torch.", ""),
                      "unet_storage": str(pipe.model.unet.conv_in.weight.dtype).replace("torch.", ""),
                      "encoder": str(pipe.model.encoder_dtype).replace("torch.", ""),
                      "decoder": str(pipe.model.decoder_dtype).replace("torch.", ""),
                      "channels_last": pipe.model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)}
    res["build_s"] = time.perf_counter() - t
    res["params_m"] = sum(p.numel() for p in pipe.model.parameters()) / 1e6
    res["rss_after_build_gb"] = rss_bytes() / 1e9
    model = pipe.model
    rng = np.random.default_rng(job["seed"])
    scale = job.get("scale", SCALE)  # the output size over the input's (bench/gpu_check.py also runs x2)
    lq_np = rng.integers(0, 256, (h // scale, w // scale, 3), dtype=np.uint8)
    lq = torch.from_numpy(lq_np).permute(2, 0, 1)[None].float() / 255  # 1x3xhxw in 0..1
    if job.get("estimate_only"):  # memory.py's figure for sizes too slow to run here: nothing is upscaled
        plan = pipe.plan((h // scale, w // scale), pipe_options(job, untiled_plan()))
        res.update(status="estimate only (not run)", tiles=plan.describe(),
                   estimate_gb={k: v / 1e9 for k, v in plan.estimate.items()},
                   peak_gb=(rss_bytes() + plan.estimate["activations"]) / 1e9, peak_kind="RSS after build + estimate")
        return res

    if dev.type == "cpu":
        # A large VAE pass can take the whole machine down (no OOM exception on Linux CPU): skip a path whose
        # estimate does not fit (ours and full: the plan's memory.estimate; ref: its untiled VAE).
        if job["path"] == "ref":
            width = model.vae.config.block_out_channels[0]  # channels at full resolution (128 for SD)
            est = UNTILED_VAE_ACTIVATIONS * width * h * w * torch.finfo(dtype).bits // 8
        else:
            est = pipe.plan((h // scale, w // scale), pipe_options(job, untiled_plan())).estimate
            est = est["activations"]  # under the run's own budget: the exact VAE spills beyond it
        avail = available_bytes()
        limit = job["mem_limit_gb"] * 1e9 if job["mem_limit_gb"] else (avail or 0) - 2e9
        if est > limit:
            res["status"] = f"skipped ({job['path']} needs ~{est / 1e9:.0f} GB more, limit {limit / 1e9:.0f} GB)"
            return res
    last, outputs = [0.0], []
    untiled = untiled_plan()

    def progress(done, total):
        if time.perf_counter() - last[0] > 5 or done == total:
            last[0] = time.perf_counter()
            log(f"  {job['model']} {job['path']} {w}x{h}: UNet/VAE tile {done}/{total}")

    def once():
        devices.synchronize(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        if job["path"] in ("ours", "full"):
            out, info = pipe.upscale(lq.permute(0, 2, 3, 1), options=pipe_options(job, untiled), progress=progress,
                                     return_info=True)
            timing = dict(info["timings"][0])
            timing["plan"] = info["tile_plan"].describe()
            out = out.permute(0, 3, 1, 2)  # the pipeline returns the kind it was given: BxHxWxC
        else:
            with torch.no_grad():
                out, timing = reference_upscale(model, lq, (h, w), model.default_prompt_embeds, tick=progress)
        devices.synchronize(dev)
        timing["total_s"] = time.perf_counter() - t0
        timing["cpu_s"] = time.process_time() - c0
        if tuple(out.shape[-2:]) != (h, w):
            raise RuntimeError(f"{job['path']} returned {tuple(out.shape)}, expected {h}x{w}")
        timing["finite"] = bool(torch.isfinite(out).all())  # random weights: recorded, not asserted
        outputs[:] = [out]
        return timing

    runs = []
    try:
        for i in range(job["warmup"]):
            log(f"{job['model']} {job['path']} {w}x{h}: warm-up {i + 1}/{job['warmup']}")
            once()
        devices.reset_peak_memory(dev)
        for i in range(job["repeats"]):
            log(f"{job['model']} {job['path']} {w}x{h}: run {i + 1}/{job['repeats']}")
            runs.append(once())
            log(f"  -> {runs[-1]['total_s']:.2f} s")
    except Exception as exc:  # an OOM is a result row; anything else is re-raised
        if not _is_oom(exc):
            raise
        res["status"] = "OOM"
        res["error"] = str(exc).splitlines()[0][:200]
        devices.empty_cache(dev)
    res["peak_gb"] = devices.peak_memory_bytes(dev) / 1e9
    res["peak_kind"] = "CUDA max allocated" if dev.type == "cuda" else "process peak RSS"
    if runs:
        res["status"] = "ok"
        res["runs"] = runs
        res.update({k: statistics.median(r.get(k, 0.0) for r in runs)
                    for k in ("total_s", "cpu_s", "encode_s", "unet_s", "decode_s")})
        res["s_per_mp"] = res["total_s"] / (w * h / 1e6)
        res["overhead"] = {k: runs[-1].get(f"{k}_overhead") for k in ("encode", "unet", "decode")}
    if outputs:
        import numpy as np

        out = outputs[0][0].permute(1, 2, 0).float().cpu().numpy()
        if job["path"] == "full" and job.get("save_to"):
            np.save(job["save_to"], out)
        elif job.get("compare_to") and Path(job["compare_to"]).exists():
            res["psnr_db"] = psnr(out, np.load(job["compare_to"]))
    other = [f"{s} {res['formats'][s].replace('bfloat16', 'bf16')}" for s in ("encoder", "decoder")
             if res["formats"][s] != res["dtype"]]
    if other:
        res["dtype"] += f" ({', '.join(other)})"
    if res["formats"]["unet_storage"] != res["formats"]["unet"]:
        res["dtype"] += f" (UNet weights {res['formats']['unet_storage'].replace('float16', 'fp16')})"
    if job["path"] == "ref":
        res["tiles"] = "enc untiled, unet 96/32, dec untiled"
    elif job["path"] == "full":
        res["tiles"] = "every stage untiled"
    elif runs:
        res["tiles"] = runs[-1]["plan"]
    return res


# ----------------------------------------------------------------------------------------------- driver side
def run_worker(job: dict, threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
                          stdout=subprocess.PIPE, stderr=None, text=True, env=env, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    # Killed (e.g. by the kernel's OOM killer) or crashed: a result row, not a crash of the whole bench.
    status = "OOM (killed)" if proc.returncode in (-9, 137) else f"failed (exit {proc.returncode})"
    return {**{k: job[k] for k in ("model", "path", "size")}, "status": status}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "sd21", "sd21-folder"], default="tiny",
                    help="tiny make-tiny model, or the SD2.1-size architecture with random weights (default tiny)")
    ap.add_argument("--sizes", default="1K,2K,4K",
                    help="comma-separated output sizes: 1K=1024x1024, 2K=2048x2048, 4K=3840x2160, FHD=1920x1080, "
                         "N (NxN) or WxH; the input is the output / 4 (default 1K,2K,4K)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (default auto)")
    ap.add_argument("--dtype", "--dtypes", dest="dtypes", default="auto",
                    help="comma-separated dtypes for our path: auto (the pipeline's defaults: fp32 + measured "
                    "per-stage formats on CPU, fp16 on GPUs), fp32, fp16, bf16 (default auto); full and ref "
                    "always run fp32")
    ap.add_argument("--weight-dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                    help="our path: dtype the UNet's weights are kept in (default auto; fp16 halves them on CPU)")
    ap.add_argument("--memory-budget-mb", type=float, default=None,
                    help="our path: the memory budget for the work on top of the loaded model (default: the "
                    "pipeline's, a fraction of free memory); the exact tiled VAE spills beyond it")
    ap.add_argument("--files-dir", default=default_files_dir(),
                    help="where the sd21 single file is written once and reused (default: a folder in the "
                    "system temp dir; ~1.9 GB)")
    ap.add_argument("--compile", action="store_true", help="our path with torch.compile on the UNet (off by default)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per configuration; the median is reported")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed runs first (default: 1, except 0 for sd21 on CPU where one run takes minutes)")
    ap.add_argument("--tile-size", type=int, default=None, help="our pipeline's tile size in output pixels "
                    "(default: the pipeline's per-device plan)")
    ap.add_argument("--paths", default="full,ours,ref",
                    help="which paths to run: full (fp32 untiled, the PSNR reference), ours, ref (default all)")
    ap.add_argument("--threads", type=int, default=None, help="OMP/MKL threads for the workers (default: inherit)")
    ap.add_argument("--mem-limit-gb", type=float, default=None,
                    help="CPU: skip the untiled reference when its estimate exceeds this (default: available - 2 GB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write all results to this JSON file")
    ap.add_argument("--estimate-only", action="store_true",
                    help="build the model and print memory.py's estimate for each size under these settings, without "
                         "upscaling (for sizes that take too long to run)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(RESULT_TAG + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except argparse.ArgumentTypeError as exc:
        ap.error(str(exc))
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not sizes or not paths or any(p not in ("full", "ours", "ref") for p in paths):
        ap.error("--sizes needs at least one size and --paths only full, ours and/or ref")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()] or ["auto"]
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    warmup = args.warmup
    if warmup is None:
        from headsup_core.devices import pick_device

        warmup = 0 if args.model.startswith("sd21") and pick_device(args.device).type == "cpu" else 1

    results = []
    with tempfile.TemporaryDirectory(prefix="headsup-bench-") as tmp:
        if args.model == "tiny":
            from headsup_core.testing.tiny_models import make_tiny

            log("writing the tiny models")
            files = str(make_tiny(Path(tmp) / "tiny")["root"])
        elif args.model == "sd21-folder":
            log(f"the SD2.1-size fp32 diffusers folder (written once) in {args.files_dir}")
            files = str(sd21_diffusers_set(args.files_dir, args.seed + 1)[0].parents[1])
        else:
            log(f"the SD2.1-size fp16 single file (written once) in {args.files_dir}")
            files = str(sd21_single_file(args.files_dir, args.seed).parent)
        order = [p for p in ("full", "ours", "ref") if p in paths]  # full first: the others compare to it
        jobs = [(size, path, dt) for size in sizes for path in order for dt in (dtypes if path == "ours" else ["fp32"])]
        for n, ((w, h), path, dt) in enumerate(jobs):
            log(f"[{n + 1}/{len(jobs)}] {args.model} {path} {dt} {w}x{h} (fresh process)")
            saved = str(Path(tmp) / f"full_{w}x{h}.npy")
            job = {"model": args.model, "path": path, "size": [w, h], "device": args.device, "dtype": dt,
                   "repeats": args.repeats, "warmup": warmup, "seed": args.seed, "tile_size": args.tile_size,
                   "files": files, "weight_dtype": args.weight_dtype,
                   "memory_budget_mb": args.memory_budget_mb, "mem_limit_gb": args.mem_limit_gb,
                   "compile": args.compile and path == "ours", "estimate_only": args.estimate_only,
                   "save_to": saved, "compare_to": saved}
            results.append(run_worker(job, args.threads))
            results[-1]["compile"] = job["compile"]
            r = results[-1]
            log(f"  {r.get('status')}: total {fmt(r.get('total_s'))} s, peak {fmt(r.get('peak_gb'))} GB, "
                f"PSNR {fmt(r.get('psnr_db'), '{:.1f}')} dB")
    table = format_table(results)
    print(f"\nHeadsUp pipeline benchmark ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, model {args.model}, "
          f"scale x{SCALE}, {os.cpu_count()} CPUs)\n")
    print(table, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r.get("status", "").startswith(("ok", "skipped", "OOM", "estimate")) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
