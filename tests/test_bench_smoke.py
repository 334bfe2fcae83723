"""bench/pipeline.py runs end to end on the tiny model and prints its table (no timing assertions)."""
from __future__ import annotations

import importlib.util
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "pipeline.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_pipeline", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=BENCH.parents[1], check=False)


def test_help_lists_the_options():
    proc = _run("--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    for opt in ("--sizes", "--model", "--device", "--dtype", "--repeats"):
        assert opt in proc.stdout


def test_bad_size_is_refused():
    proc = _run("--sizes", "1000x7", timeout=120)
    assert proc.returncode == 2 and "multiples of 4" in proc.stderr


def test_reference_tiles_cover_the_latent_like_osediff():
    mod = _bench_module()
    assert mod._starts(128, 96, 32) == [0, 32]
    starts = mod._starts(270, 96, 32)  # 4K output: 270 latent rows
    assert starts[0] == 0 and starts[-1] + 96 == 270
    assert all(b - a <= 64 for a, b in itertools.pairwise(starts))  # overlap never below 32
    assert mod.parse_size("4K") == (3840, 2160) and mod.parse_size("512") == (512, 512)


def test_tiny_bench_prints_the_table(tmp_path):
    out_json = tmp_path / "bench.json"
    proc = _run("--model", "tiny", "--sizes", "256", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                "--json", str(out_json))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| model | output | path | dtype | status | s/MP |" in proc.stdout
    ours = re.search(r"^\| tiny \| 256x256 \| ours \| [^|]+ \| ok \| ([0-9.]+) \|.*\| ([0-9.]+|inf) \| ([0-9.]+) \| (\w+)",
                     proc.stdout, re.MULTILINE)
    # inf: at 256² the tiny model fits one tile everywhere, so the reference path equals the untiled one exactly
    ref = re.search(r"^\| tiny \| 256x256 \| ref \| float32 \| ok \| ([0-9.]+) \|.*\| ([0-9.]+|inf) \| - \|",
                    proc.stdout, re.MULTILINE)
    full = re.search(r"^\| tiny \| 256x256 \| full \| float32 \| ok \| .*\| ref \| - \|", proc.stdout, re.MULTILINE)
    assert ours and ref and full, proc.stdout
    assert float(ours.group(3)) > 0  # the measured ours/ref ratio
    assert float(ours.group(2)) > 30 and float(ref.group(2)) > 30  # output PSNR vs our fp32 untiled output
    import json

    rows = json.loads(out_json.read_text())
    assert [r["path"] for r in rows] == ["full", "ours", "ref"]  # full first: the others compare to it
    for r in rows:
        assert r["status"] == "ok" and r["peak_gb"] > 0 and r["runs"][0]["finite"] and r["code"]
        assert {"encode_s", "unet_s", "decode_s"} <= set(r)
        assert ("psnr_db" in r) == (r["path"] != "full")


def test_untiled_reference_is_skipped_not_run_when_it_would_not_fit(tmp_path):
    out_json = tmp_path / "bench.json"
    proc = _run("--model", "tiny", "--sizes", "256", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                "--paths", "ref", "--mem-limit-gb", "0.001", "--json", str(out_json))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| tiny | 256x256 | ref | float32 | skipped |" in proc.stdout


def test_estimate_only_builds_but_does_not_upscale(tmp_path):
    """Sizes too slow to run get memory.py's estimate under the same settings, and say it was not run."""
    import json

    out_json = tmp_path / "bench.json"
    proc = _run("--model", "tiny", "--sizes", "256,1024", "--device", "cpu", "--paths", "ours", "--estimate-only",
                "--memory-budget-mb", "100", "--json", str(out_json))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out_json.read_text())
    assert [r["status"] for r in rows] == ["estimate only (not run)"] * 2 and "runs" not in rows[0]
    small, large = (r["estimate_gb"] for r in rows)
    assert large["images"] == pytest.approx(16 * small["images"])  # 16x the pixels
    assert rows[1]["peak_gb"] >= large["activations"] and rows[1]["tiles"]


@pytest.mark.slow
def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    """bench/gpu_check.sh --device cpu --dry-run: every row of the GPU check's table runs (small sizes, the tiny
    model, compile with the eager backend) and the markdown table names the device, torch and commit."""
    root = BENCH.parents[1]
    out = tmp_path / "gpu_check.md"
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "COMFYUI_PYTHON")}
    env.update(OMP_NUM_THREADS="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(root / "bench" / "gpu_check.sh"), "--device", "cpu", "--dry-run", "--out",
                           str(out)], capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.read_text()
    assert table in proc.stdout and "(dry run)" in table and "torch " in table and "commit " in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "->" in line]
    assert len(rows) == 7 and all("| ok |" in row for row in rows), table
    assert sum("+compile" in row for row in rows) == 2
    psnr = [float(row.split("|")[6]) for row in rows if "ours" in row]
    assert all(p > 30 for p in psnr), psnr  # half precision lands near the fp32 reference


def test_load_memory_reports_each_base_format(tiny_models):
    bases = f"{tiny_models['base_single']},{tiny_models['base']}"
    proc = subprocess.run([sys.executable, "-m", "bench.load_memory", "--bases", bases, "--weight-dtype", "fp16"],
                          capture_output=True, text=True, timeout=600, cwd=BENCH.parents[1], check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^\| (\S+) \| float16 \| [0-9.]+ \| ([0-9.]+) GB \| \*\*([0-9.]+) GB\*\* \|", proc.stdout,
                      re.MULTILINE)
    assert [r[0] for r in rows] == [Path(tiny_models["base_single"]).name, Path(tiny_models["base"]).name]
    assert all(float(peak) >= float(loaded) > 0 for _, loaded, peak in rows)
