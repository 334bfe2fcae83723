"""``headsup upscale DIR -o OUT --engine ray`` writes the same files as folder mode, byte for byte (tiny models,
Ray local on 2 CPUs, two CPU pipeline actors), reports failures the same way and resumes with --skip-existing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headsup_core.cli import main


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
    yield ray
    ray.shutdown()


def _files(folder: Path) -> dict[Path, bytes]:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_ray_engine_writes_the_folder_mode_files(ray_local, tmp_path, tiny_models, capsys):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(4):
        im = Image.fromarray(rng.integers(0, 255, (12 + 2 * k, 16, 3), dtype=np.uint8))
        im.save(src / ("sub" if k % 2 else "") / f"p{k}.{'jpg' if k == 3 else 'png'}")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    models = ["--base", str(tiny_models["base_single"]), "--weights", str(tiny_models["headsup"]), "--faces", "none"]
    common = ["-r", "--scale", "2", "--format", "same", "-q"] + models
    assert main(["upscale", str(src), "-o", str(tmp_path / "local")] + common) == 1
    local_err = capsys.readouterr().err
    assert main(["upscale", str(src), "-o", str(tmp_path / "ray"), "--engine", "ray", "--ray-actors", "2"]
                + common) == 1
    ray_err = capsys.readouterr().err
    local, by_ray = _files(tmp_path / "local"), _files(tmp_path / "ray")
    assert len(local) == 4 and Path("sub/p1_headsup_x2.png") in local and Path("p2_headsup_x2.png") in local
    assert by_ray == local  # same names, same bytes (pixels and metadata)
    assert "4 done, 0 skipped, 1 failed" in local_err and "4 done, 0 skipped, 1 failed" in ray_err
    assert [x for x in ray_err.splitlines() if "failed:" in x] == [x for x in local_err.splitlines() if "failed:" in x]
    # resume: only the broken file is tried again
    assert main(["upscale", str(src), "-o", str(tmp_path / "ray"), "--engine", "ray", "--skip-existing"]
                + common) == 1
    assert "0 done, 4 skipped, 1 failed" in capsys.readouterr().err and _files(tmp_path / "ray") == local


def test_ray_engine_bad_actor_count_is_one_sentence(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert main(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--engine", "ray",
                 "--ray-actors", "0", "--faces", "none"]) != 0
    err = capsys.readouterr().err
    assert "--ray-actors must be 1 or more" in err and "Traceback" not in err


def test_ray_engine_without_ray_names_the_extra(monkeypatch, tmp_path, capsys):
    import builtins

    real = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("no ray")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert main(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--engine", "ray",
                 "--faces", "none"]) != 0
    err = capsys.readouterr().err
    assert 'comfyui-headsup[scale]' in err and "Traceback" not in err and not (tmp_path / "o").exists()
