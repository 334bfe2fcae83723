"""The headsup CLI: --help everywhere, the README's main job on a real photo, errors, atomic writes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from headsup_core.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_every_command_has_help(capsys):
    commands = _subcommands()
    assert {"upscale", "make-tiny", "convert-osediff", "doctor"} <= set(commands)
    for cmd in [[]] + [[c] for c in commands]:
        with pytest.raises(SystemExit) as exit_info:
            main(cmd + ["--help"])
        assert exit_info.value.code == 0
        assert "usage:" in capsys.readouterr().out


def _headsup() -> list[str]:
    exe = shutil.which("headsup", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "headsup_core.cli"]


def test_readme_main_job_on_a_real_photo(tmp_path, t1_jpg):
    """The README's first command, verbatim in spirit: make the tiny models, upscale t1.jpg x4."""
    readme = (REPO / "README.md").read_text()
    assert "headsup make-tiny" in readme and "headsup upscale" in readme
    subprocess.run(_headsup() + ["make-tiny", str(tmp_path / "tiny")], check=True, capture_output=True)
    out = tmp_path / "t1_x4.png"
    done = subprocess.run(_headsup() + ["upscale", str(t1_jpg), "-o", str(out), "--scale", "4",
                                        "--base", str(tmp_path / "tiny" / "base.safetensors"),
                                        "--weights", str(tmp_path / "tiny" / "headsup.safetensors"), "-q"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with Image.open(out) as im:
        assert im.size == (1280 * 4, 886 * 4)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".headsup-")], "temporary file left behind"


def test_errors_are_one_line_with_exit_code_2(tmp_path, tiny_models, capsys):
    img = tmp_path / "in.png"
    Image.new("RGB", (8, 8)).save(img)
    base = ["--base", str(tiny_models["base_single"]), "--weights", str(tiny_models["headsup"])]
    cases = [
        (["upscale", str(img), "-o", str(tmp_path / "o.png"), "--scale", "0.5"] + base, "scale"),
        (["upscale", str(tmp_path / "missing.png"), "-o", str(tmp_path / "o.png")] + base, "not found"),
        (["upscale", str(img), "-o", str(tmp_path / "o.png"), "--base", str(tmp_path / "nobase")], "Base model not found"),
        (["upscale", str(img), "-o", str(tmp_path / "o.png"), "--reference", str(img), "--faces", "none"] + base,
         "face analysis"),
        (["convert-osediff", str(tmp_path / "x.pkl"), "-o", str(tmp_path / "y.safetensors")], "not found"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.startswith("headsup: error:")
    assert not (tmp_path / "o.png").exists()


def test_existing_output_is_not_overwritten_without_flag(tmp_path, tiny_models, capsys):
    img, out = tmp_path / "in.png", tmp_path / "out.png"
    Image.new("RGB", (8, 8)).save(img)
    out.write_bytes(b"keep me")
    argv = ["upscale", str(img), "-o", str(out), "--base", str(tiny_models["base_single"]), "-q"]
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert main(argv + ["--overwrite", "--scale", "2"]) == 0
    assert Image.open(out).size == (16, 16)


def test_folder_in_folder_out(tmp_path, tiny_models):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        Image.new("RGB", (10 + i, 6)).save(src / f"p{i}.png")
    (src / "notes.txt").write_text("not an image")
    argv = ["upscale", str(src), "-o", str(tmp_path / "out"), "--scale", "2", "--base", str(tiny_models["base"]),
            "--weights", str(tiny_models["osediff"]), "-q"]
    assert main(argv) == 0
    sizes = sorted(Image.open(p).size for p in (tmp_path / "out").iterdir())
    assert sizes == [(20, 12), (22, 12)]


def test_atomic_save_leaves_nothing_on_failure(tmp_path, monkeypatch):
    from headsup_core.files.write import save_image_atomic

    image = Image.new("RGB", (4, 4))

    def broken_save(self, *args, **kwargs):
        Path(args[0]).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError):
        save_image_atomic(image, tmp_path / "out.png")
    assert list(tmp_path.iterdir()) == []


def test_convert_osediff_and_doctor(tmp_path, tiny_models, capsys):
    out = tmp_path / "converted.safetensors"
    assert main(["convert-osediff", str(tiny_models["osediff"]), "-o", str(out)]) == 0 and out.exists()
    root = tmp_path / "models"
    (root / "headsup").mkdir(parents=True)
    shutil.copy(out, root / "headsup" / "converted.safetensors")
    capsys.readouterr()
    assert main(["doctor", "--models", str(root)]) == 0
    report = capsys.readouterr().out
    assert "converted.safetensors" in report and "missing: put v2-1_512-ema-pruned.safetensors" in report


def test_download_is_opt_in_and_fails_clearly_offline(tmp_path, monkeypatch):
    from headsup_core.errors import MissingModelError
    from headsup_core.model_paths import download_base, resolve_base

    with pytest.raises(MissingModelError, match="--download"):
        resolve_base(None, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingModelError, match="offline"):
        download_base(tmp_path)


def test_memory_budget_and_weight_dtype_reach_the_pipeline(tmp_path, tiny_models, monkeypatch):
    from headsup_core import runner
    from headsup_core.pipeline import HeadsUpPipeline

    seen = {}
    real_from_files, real_retry = HeadsUpPipeline.from_files.__func__, runner.upscale_with_retry

    def from_files(cls, *a, **k):
        seen["weight_dtype"] = k.get("weight_dtype")
        return real_from_files(cls, *a, **k)

    def retry(pipe, image, *, options=None, **k):
        seen["budget"] = options.memory_budget_mb
        return real_retry(pipe, image, options=options, **k)

    monkeypatch.setattr(HeadsUpPipeline, "from_files", classmethod(from_files))
    monkeypatch.setattr(runner, "upscale_with_retry", retry)
    Image.new("RGB", (12, 10)).save(tmp_path / "a.png")
    argv = ["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--scale", "2", "--base",
            str(tiny_models["base"]), "--weights", str(tiny_models["osediff"]), "-q", "--weight-dtype", "fp16",
            "--memory-budget-mb", "300"]
    assert main(argv) == 0
    assert seen == {"weight_dtype": "fp16", "budget": 300.0}
    assert Image.open(next((tmp_path / "out").iterdir())).size == (24, 20)
