"""Whole folders (relative paths, resume, per-file failures, summary) and signals (stop at a tile boundary,
nothing left behind, 130/143; spill folders of dead processes removed at start)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from headsup_core.cli import main


def _models(tiny_models) -> list[str]:
    return ["--base", str(tiny_models["base_single"]), "--weights", str(tiny_models["headsup"]), "--faces", "none"]


def _folder_of_twenty(src: Path) -> list[Path]:
    """17 good images (some in sub-folders) and 3 broken ones."""
    good = []
    for i in range(17):
        folder = src / ("a" if i % 3 == 0 else "b/c" if i % 3 == 1 else "")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"p{i:02d}.{'jpg' if i % 2 else 'png'}"
        Image.new("RGB", (8 + i % 4, 6), (10 * i, 100, 50)).save(path)
        good.append(path)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (src / "b" / "empty.jpg").write_bytes(b"")
    full = src / "a" / "cut.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(full)
    full.write_bytes(full.read_bytes()[:60])
    return good


def test_folder_of_twenty_with_three_broken(tmp_path, tiny_models, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    good = _folder_of_twenty(src)
    argv = ["upscale", str(src), "-o", str(out), "-r", "--scale", "2", "-q"] + _models(tiny_models)
    assert main(argv) == 1
    err = capsys.readouterr().err
    failures = [line for line in err.splitlines() if line.startswith("headsup: failed:")]
    assert len(failures) == 3 and all("Cannot read image" in line for line in failures), err
    assert "17 done, 0 skipped, 3 failed" in err and "Traceback" not in err
    outputs = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert outputs == sorted(p.relative_to(src).with_name(f"{p.stem}_headsup_x2.png") for p in good)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert main(argv + ["--skip-existing"]) == 1  # the 3 broken files fail again; the 17 are left alone
    assert "0 done, 17 skipped, 3 failed" in capsys.readouterr().err
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_skip_existing_with_nothing_to_do_loads_no_model(tmp_path, capsys):
    src, out = tmp_path / "in.png", tmp_path / "out.png"
    Image.new("RGB", (8, 8)).save(src)
    out.write_bytes(b"done before")
    assert main(["upscale", str(src), "-o", str(out), "--skip-existing", "--base", str(tmp_path / "none")]) == 0
    assert out.read_bytes() == b"done before"


def test_without_recursive_only_the_top_folder(tmp_path, tiny_models, capsys):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(src / "top.png")
    Image.new("RGB", (8, 8)).save(src / "sub" / "deep.png")
    assert main(["upscale", str(src), "-o", str(tmp_path / "out"), "--scale", "2", "--format", "jpg", "-q"]
                + _models(tiny_models)) == 0
    assert [p.name for p in (tmp_path / "out").rglob("*")] == ["top_headsup_x2.jpg"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_at_the_next_tile_and_leaves_nothing(tmp_path, tiny_models, monkeypatch, capsys, signum):
    from headsup_core.pipeline import HeadsUpPipeline

    real, before = HeadsUpPipeline.upscale, signal.getsignal(signum)
    seen = []

    def upscale(self, image, *args, progress=None, **kwargs):
        def tick(done, total):
            seen.append((done, total))
            if done == 1:
                os.kill(os.getpid(), signum)
            if progress is not None:
                progress(done, total)

        return real(self, image, *args, progress=tick, **kwargs)

    monkeypatch.setattr(HeadsUpPipeline, "upscale", upscale)
    monkeypatch.setenv("HEADSUP_SPILL_DIR", str(tmp_path))
    src, out = tmp_path / "in.png", tmp_path / "out" / "o.png"
    Image.new("RGB", (64, 64), (90, 80, 70)).save(src)
    code = main(["upscale", str(src), "-o", str(out), "--scale", "2", "--tile-size", "64", "-q"]
                + _models(tiny_models))
    assert code == 128 + signum and seen[-1][0] == 1 < seen[-1][1], seen  # stopped at the tile boundary
    err = capsys.readouterr().err
    assert signal.Signals(signum).name in err and "Traceback" not in err
    assert signal.getsignal(signum) is before and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]  # no temp output, no spill folder


def test_spill_folders_of_dead_processes_are_removed(tmp_path, monkeypatch):
    from headsup_core.spill import remove_stale_spill_dirs

    monkeypatch.setenv("HEADSUP_SPILL_DIR", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    for name in (f"headsup-spill-{dead_pid}-abc", f"headsup-spill-{os.getpid()}-xyz", "headsup-spill-old",
                 "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "1.bin").write_bytes(b"x")
    removed = remove_stale_spill_dirs()
    assert [Path(p).name for p in removed] == [f"headsup-spill-{dead_pid}-abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"headsup-spill-{os.getpid()}-xyz", "headsup-spill-old", "other"])


def test_spill_folder_names_carry_the_pid(tmp_path, monkeypatch):
    import torch

    from headsup_core.spill import SpillStore

    monkeypatch.setenv("HEADSUP_SPILL_DIR", str(tmp_path))
    with SpillStore(ram_budget=0) as store:
        slot = store.put(torch.zeros(16))
        assert Path(store.directory).name.startswith(f"headsup-spill-{os.getpid()}-")
        slot.take()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_real_sigterm_mid_spill_leaves_nothing(tmp_path, tiny_models):
    """A separate process, a real SIGTERM while the exact tiled VAE has spilled to disk: exit 143, no spill
    folder, no output, no temporary file."""
    import time

    spill, out = tmp_path / "spill", tmp_path / "out"
    spill.mkdir()
    Image.effect_noise((256, 256), 40).convert("RGB").save(tmp_path / "in.png")
    env = dict(os.environ, HEADSUP_SPILL_DIR=str(spill), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                           os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "headsup_core.cli", "upscale", str(tmp_path / "in.png"), "-o",
                             str(out / "o.png"), "--scale", "2", "--memory-budget-mb", "1", "--tile-size", "64"]
                            + _models(tiny_models), env=env, stderr=subprocess.PIPE, text=True)
    start = time.time()
    while proc.poll() is None and not list(spill.iterdir()) and time.time() - start < 600:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it spilled"
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert list(spill.iterdir()) == [] and not out.exists()


def test_full_disk_stops_the_batch_with_no_partial_file(tmp_path, tiny_models, monkeypatch, capsys):
    import errno

    from headsup_core.files import write

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(src / f"p{i}.png")

    def full(image, tmp, *args):
        Path(tmp).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(write, "_write", full)
    assert main(["upscale", str(src), "-o", str(out), "--scale", "2", "-q"] + _models(tiny_models)) == 1
    err = capsys.readouterr().err
    assert err.count("headsup: failed:") == 1 and f"no space left on {out}" in err and "disk is full" in err
    assert "0 done, 0 skipped, 1 failed, 2 not started" in err and list(out.iterdir()) == []
