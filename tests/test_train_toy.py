"""bench/train_toy.py: the study's table states per-seed arm differences correctly, and its plot is written."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "train_toy.py"


def _mod():
    spec = importlib.util.spec_from_file_location("bench_train_toy", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake():
    runs = []
    for seed in (0, 1, 2):
        for arm, face in (("R", 25.0), ("N", 23.5), ("F0", 24.0), ("F-id", 24.2)):
            curve = [{"step": s, "face_psnr": face - 5 + s / 10 + seed * 0.1, "bg_psnr": 22.0, "psnr": 22.5,
                      "face_lpips": 0.1, "id_sim": 0.9} for s in (0, 25, 50)]
            runs.append({"arm": arm, "seed": seed, "curve": curve, "final": curve[-1]})
    return runs


def test_summary_reports_paired_differences():
    table = _mod().summarise(_fake())
    assert "| R | 25.100 ± 0.082" in table
    assert "R - N face_psnr: 1.500 ± 0.000 (per seed: +1.500, +1.500, +1.500)" in table
    assert "R - N bg_psnr: 0.000" in table
    assert "F-id - F0 face_psnr: 0.200 ± 0.000" in table


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    _mod().plot(_fake(), tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 5000
