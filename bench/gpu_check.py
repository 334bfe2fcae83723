"""GPU check (issue 25): the SD2.1-size model on one NVIDIA GPU at the target sizes, as one markdown table.

    bash bench/gpu_check.sh                            # on the GPU box: < 10 minutes, nothing downloaded
    bash bench/gpu_check.sh --device cpu --dry-run     # the same code on small sizes and the tiny model (~1 min)

Per case (input -> output): the fp32 untiled run is the reference (one run); then ours in fp16 and bf16, each
without and with ``torch.compile`` on the UNet (compiled rows last, as time allows): median seconds of
``--repeats`` runs after a warm-up, peak VRAM (CUDA max allocated), PSNR against the fp32 output. Every row runs in a fresh process through bench/pipeline.py's worker
(the model is the seeded random SD2.1-size single file of bench/models.py). With ``COMFYUI_PATH`` set, the
ComfyUI paths (HeadsUpLoader, HeadsUpPatchModel) run in-process inside that ComfyUI on the same device and are
compared with the standalone pipeline (bench/gpu_check_comfy.py). The table names the device, driver, torch and
commit; it goes to stdout and to ``--out``. Rows that would run past ``--time-budget-s`` are skipped and say so.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.pipeline import RESULT_TAG, run_worker
from bench.report import code_version, fmt

ROOT = Path(__file__).resolve().parents[1]
# (input w, h), scale: the three cases. Targets apply to the first.
CASES = [((960, 540), 4), ((1920, 1080), 2), ((512, 512), 4)]
DRY_CASES = [((48, 32), 4), ((64, 48), 2)]
TARGET_S, TARGET_VRAM_GB, TARGET_LEVELS = 0.5, 4.0, 1.0
DTYPES = ("fp16", "bf16")
# A compiled row costs its compilation on top (tens of seconds per tile shape): started only with this much left.
COMPILE_RESERVE_S = 90


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def device_report(device: str) -> dict:
    """Device, driver, torch, CUDA and commit, for the table's header."""
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda or "-", "commit": code_version(),
            "python": platform.python_version()}
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device is visible to torch (use --device cpu --dry-run on a CPU).")
        props = torch.cuda.get_device_properties(torch.device(device))
        info["device"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm {props.major}.{props.minor})"
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout.split()
            info["driver"] = smi[0] if smi else "?"
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "? (no nvidia-smi)"
    else:
        info["device"] = f"{device} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)"
        info["driver"] = "-"
    return info


def _jobs(case, args, files: str, tmp: str, first: bool) -> list[dict]:
    """The fp32 reference, then ours per dtype without and with compile (a dry run's later cases: fp16 only,
    to stay quick)."""
    (w, h), scale = case
    saved = str(Path(tmp) / f"full_{w}x{h}x{scale}.npy")
    base = {"model": args.model, "size": [w * scale, h * scale], "scale": scale, "device": args.device,
            "repeats": args.repeats, "warmup": args.warmup, "seed": 0, "tile_size": None, "files": files,
            "weight_dtype": "auto", "memory_budget_mb": None, "mem_limit_gb": None, "save_to": saved,
            "compare_to": saved}
    jobs = [dict(base, path="full", dtype="fp32", compile=False, repeats=1, warmup=0)]  # the reference only
    for compiled in ((False, True) if first or not args.dry_run else (False,)):
        for dt in (DTYPES if first or not args.dry_run else DTYPES[:1]):
            job = dict(base, path="ours", dtype=dt, compile=compiled)
            if compiled and args.dry_run:
                job["compile_kwargs"] = {"backend": "eager"}  # the plumbing, without a compiler on the CPU
            jobs.append(job)
    return jobs


def run_cases(args, files: str, deadline: float) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="headsup-gpu-check-") as tmp:
        cases = DRY_CASES if args.dry_run else CASES
        jobs = [(case, job) for case in cases for job in _jobs(case, args, files, tmp, case == cases[0])]
        # Every case's plain rows first, the compiled ones (slowest, and first to go when time runs out) last.
        for case, job in sorted(jobs, key=lambda cj: cj[1]["compile"]):
            label = f"{job['path']} {job['dtype']}{' +compile' if job['compile'] else ''}"
            left = deadline - time.time()
            if left < (COMPILE_RESERVE_S if job["compile"] else 0) or left <= 0:
                res = {"status": f"skipped (time budget: {max(0, left):.0f} s left)"}
            else:
                log(f"{case[0][0]}x{case[0][1]} x{case[1]}: {label}")
                res = run_worker(job, args.threads)
            res.update(case=case, label=label, path=job["path"], compile=job["compile"])
            log(f"  {res.get('status')}: {fmt(res.get('total_s'))} s, peak {fmt(res.get('peak_gb'))} GB, "
                f"PSNR {fmt(res.get('psnr_db'), '{:.1f}')} dB")
            rows.append(res)
    return rows


def run_comfy(args) -> dict:
    """bench/gpu_check_comfy.py in ComfyUI's interpreter (``COMFYUI_PYTHON``, default this one)."""
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    cmd = [python, "-m", "bench.gpu_check_comfy", "--device", args.device] + (["--dry-run"] if args.dry_run else [])
    log("ComfyUI: HeadsUpLoader and HeadsUpPatchModel in-process, against the standalone pipeline")
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=False,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    return {"status": f"failed (exit {proc.returncode}; see the log above)"}


def _case_name(case) -> str:
    (w, h), scale = case
    return f"{w}x{h} -> {w * scale}x{h * scale} (x{scale})"


def markdown(info: dict, rows: list[dict], comfy: dict | None, args) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    model = "SD2.1-size, random weights" if args.model == "sd21" else "tiny (make-tiny)"
    header = (f"Driver {info['driver']}, CUDA {info['cuda']}, torch {info['torch']}, Python {info['python']}, "
              f"commit {info['commit']}; model {model}; median of {args.repeats} run(s) after {args.warmup} warm-up; "
              "peak = CUDA max allocated (CPU: process peak RSS); PSNR against the fp32 untiled output of the same "
              "case.")
    out = [f"### GPU check: {info['device']}, {when}{' (dry run)' if args.dry_run else ''}", "", header, "",
           "| case | run | status | median s | peak GB | PSNR dB | tiles | target |", "|---|---|---|---|---|---|---|---|"]
    first = (DRY_CASES if args.dry_run else CASES)[0]
    for r in rows:
        target = "-"
        if not args.dry_run and r["case"] == first and r["path"] == "ours" and r.get("total_s") is not None:
            ok = r["total_s"] <= TARGET_S and r.get("peak_gb", 1e9) <= TARGET_VRAM_GB
            target = f"{'met' if ok else 'MISSED'} (<= {TARGET_S} s, <= {TARGET_VRAM_GB:.0f} GB)"
        psnr = "ref" if r["path"] == "full" else fmt(r.get("psnr_db"), "{:.1f}")
        out.append(f"| {_case_name(r['case'])} | {r['label']} | {r.get('status', '?')} | "
                   f"{fmt(r.get('total_s'), '{:.3f}')} | {fmt(r.get('peak_gb'))} | {psnr} | {r.get('tiles', '-')} | "
                   f"{target} |")
    if comfy is not None:
        out += ["", "| ComfyUI path (in-process) | device / dtype | max difference to standalone | target |",
                "|---|---|---|---|"]
        for name, res in comfy.get("paths", {}).items():
            levels = res.get("max_levels")
            verdict = "-" if levels is None else ("met" if levels <= TARGET_LEVELS else "MISSED")
            out.append(f"| {name} | {res.get('device', '-')} / {res.get('dtype', '-')} | "
                       f"{fmt(levels, '{:.0f}')} grey levels ({res.get('status', '?')}) | {verdict} (<= 1/255) |")
        if not comfy.get("paths"):
            out.append(f"| - | - | {comfy.get('status', '?')} | - |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu (with --dry-run)")
    ap.add_argument("--dry-run", action="store_true",
                    help="small sizes, the tiny model, one run, no warm-up, compile with the eager backend")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 3; dry run 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 1; dry run 0)")
    ap.add_argument("--time-budget-s", type=float, default=540,
                    help="rows that would start after this many seconds are skipped (default 540)")
    ap.add_argument("--files-dir", default=str(Path(tempfile.gettempdir()) / "headsup-bench-files"),
                    help="where the SD2.1-size random single file is written once (~1.9 GB)")
    ap.add_argument("--threads", type=int, default=None, help="OMP/MKL threads for the workers (default: inherit)")
    ap.add_argument("--out", default=str(ROOT / "out" / "gpu_check.md"), help="the markdown table is written here too")
    args = ap.parse_args(argv)
    if not args.dry_run and not args.device.startswith("cuda"):
        ap.error("the full check is for a CUDA GPU; on a CPU use --device cpu --dry-run")
    args.repeats = args.repeats or (1 if args.dry_run else 3)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.dry_run else 1)
    args.model = "tiny" if args.dry_run else "sd21"
    start = time.time()
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # the workers' torch.compile / diffusers notices
    info = device_report(args.device)
    log(f"device {info['device']}, driver {info['driver']}, CUDA {info['cuda']}, torch {info['torch']}, "
        f"commit {info['commit']}")
    with tempfile.TemporaryDirectory(prefix="headsup-gpu-check-models-") as tmp:
        if args.model == "tiny":
            from headsup_core.testing.tiny_models import make_tiny

            files = str(make_tiny(Path(tmp) / "tiny")["root"])
        else:
            from bench.models import sd21_single_file

            log(f"the SD2.1-size random single file in {args.files_dir} (written once)")
            files = str(sd21_single_file(args.files_dir).parent)
        rows = run_cases(args, files, start + args.time_budget_s)
    comfy = run_comfy(args) if os.environ.get("COMFYUI_PATH") else None
    table = markdown(info, rows, comfy, args)
    print("\n" + table, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table)
    log(f"table written to {args.out}; {time.time() - start:.0f} s in all")
    failed = [r for r in rows if not str(r.get("status", "")).startswith(("ok", "skipped"))]
    if comfy is not None and not str(comfy.get("status", "")).startswith("ok"):
        failed.append(comfy)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
