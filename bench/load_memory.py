"""Peak RSS while loading a base, per base format: the SD2.1-size single file against the diffusers folder.

    python -m bench.load_memory --weight-dtype fp16
    python -m bench.load_memory --bases /path/to/v2-1_512-ema-pruned.safetensors,/path/to/diffusers-folder

Each base is built with ``build_model`` (what every front end calls) in a fresh process on the CPU, so the peak is
that load's own: the process's peak RSS (``ru_maxrss``) and its RSS once loaded. Without ``--bases`` it loads the
benchmark's two random-weight sets (bench/models.py: the seed-0 fp16 single file, the seed-1 fp32 folder).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.memstat import peak_rss_bytes, rss_bytes  # noqa: E402
from bench.models import default_files_dir, sd21_diffusers_set, sd21_single_file  # noqa: E402
from bench.report import code_version  # noqa: E402

TAG = "LOAD_RESULT "


def worker(base: str, weight_dtype: str) -> dict:
    from headsup_core.loading.build import build_model

    t = time.perf_counter()
    model, info = build_model(base, None, "cpu", None, weight_dtype=weight_dtype)
    seconds = time.perf_counter() - t
    return {"base": base, "weight_dtype": weight_dtype, "dtypes": info["dtypes"], "load_s": seconds,
            "rss_loaded_gb": rss_bytes() / 1e9,
            "peak_rss_gb": peak_rss_bytes() / 1e9,
            "code": code_version()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bases", default=None, help="comma-separated bases (single files or diffusers folders); "
                                                  "default: the benchmark's single file and folder")
    ap.add_argument("--weight-dtype", default="fp16", choices=["auto", "fp32", "fp16", "bf16"],
                    help="how the UNet's weights are kept (default fp16, the low-memory setting)")
    ap.add_argument("--files-dir", default=default_files_dir(), help="where the benchmark's weight sets live")
    ap.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(TAG + json.dumps(worker(*args.worker)), flush=True)
        return 0
    if args.bases:
        bases = [b for b in args.bases.split(",") if b]
    else:
        bases = [str(sd21_single_file(args.files_dir, 0)), str(sd21_diffusers_set(args.files_dir, 1)[0])]
    print("| base | UNet weights | load s | RSS loaded | peak RSS while loading | commit |\n|---|---|---|---|---|---|")
    ok = True
    for base in bases:
        proc = subprocess.run([sys.executable, "-m", "bench.load_memory", "--worker", base, args.weight_dtype],
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1], check=False)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(TAG)), None)
        if line is None:
            print(f"| {Path(base).name} | - | failed (exit {proc.returncode}) | - | - | - |")
            ok = False
            continue
        r = json.loads(line[len(TAG):])
        print(f"| {Path(base).name} | {r['dtypes']['unet']['storage']} | {r['load_s']:.1f} | "
              f"{r['rss_loaded_gb']:.2f} GB | **{r['peak_rss_gb']:.2f} GB** | {r['code']} |", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
