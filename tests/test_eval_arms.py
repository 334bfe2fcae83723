"""``headsup eval-arms``: a saved arm (tiny models) measured on a few deepface photos paired by identities.csv."""
from __future__ import annotations

import csv
import json
import math
import shutil
from importlib import resources
from pathlib import Path

import pytest

pytest.importorskip("dlib")
pytest.importorskip("skimage")
DEEPFACE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "faces-deepface"
# two people with two small photos each, and one person with a single photo (no reference: not evaluated)
PHOTOS = {"img10.jpg": "0", "img5.jpg": "0", "img44.jpg": "1", "img46.jpg": "1", "img25.jpg": "12"}


@pytest.fixture(scope="module")
def arm_and_photos(tmp_path_factory):
    from headsup_core.faces.dlib_backend import default_model_dir

    if default_model_dir() is None:
        pytest.skip("face-recognition-models is not installed")
    if not DEEPFACE.is_dir():
        pytest.skip("../shared/data/faces-deepface is not present")
    from headsup_core.testing.tiny_models import make_tiny
    from headsup_core.train.config import load_train_config
    from headsup_core.train.trainer import Trainer

    root = tmp_path_factory.mktemp("arms")
    base = make_tiny(root / "tiny")["base"]
    cfg = load_train_config(resources.files("headsup_core").joinpath("configs/train_tiny.yaml"),
                            {"base": str(base), "output_dir": str(root / "run"),
                             "losses": {"face_id": 0.0, "lpips": 0.0, "face_lpips": 0.0}})
    arm = root / "arms" / "R_s0"
    arm.mkdir(parents=True)
    Trainer(cfg).save_checkpoint(arm / "weights.safetensors")
    (arm / "arm.json").write_text(json.dumps({"arm": "R", "seed": 0, "base": "../../tiny/base"}))
    photos = root / "photos"
    photos.mkdir()
    for name in PHOTOS:
        shutil.copy(DEEPFACE / name, photos / name)
    (photos / "identities.csv").write_text("file,identity\n" + "".join(f"{k},{v}\n" for k, v in PHOTOS.items()))
    return root, photos


def test_eval_arms_writes_sane_rows_and_means(arm_and_photos, capsys):
    from headsup_core.cli import main
    from headsup_core.eval.arms import MEASURES

    root, photos = arm_and_photos
    out = root / "out"
    assert main(["eval-arms", str(root / "arms"), "--data", str(photos), "-o", str(out), "-q"]) == 0
    assert "| R | reference | 1 |" in capsys.readouterr().out
    with (out / "arms_eval.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["arm", "seed", "mode", "photo", "reference", *MEASURES, "bicubic_face_psnr"]
    # 4 photos with another photo of their person, each with and without its reference; img25 has none
    assert len(rows) == 8 and not any(r["photo"].startswith("img25") for r in rows)
    assert {r["reference"] for r in rows if r["mode"] == "reference"} == {"True"}
    assert {r["reference"] for r in rows if r["mode"] == "none"} == {"False"}
    for r in rows:
        for k in ("face_psnr", "bg_psnr", "psnr", "bicubic_face_psnr"):
            assert 3.0 < float(r[k]) < 60.0, (k, r[k])
        assert -1.0 <= float(r["face_ssim"]) <= 1.0
        dl, tc = float(r["id_dlib"]), float(r["id_torch"])
        assert -1.0 <= dl <= 1.0 and abs(dl - tc) < 2e-3  # the torch port measures as dlib's C++ does
        assert float(r["bicubic_face_psnr"]) > float(r["face_psnr"]) - 30
    means = json.loads((out / "arms_eval.json").read_text())["means"]
    assert [(m["arm"], m["mode"], m["crops"]) for m in means] == [("R", "reference", 4), ("R", "none", 4)]
    face = [float(r["face_psnr"]) for r in rows if r["mode"] == "reference"]
    assert math.isclose(means[0]["face_psnr"], sum(face) / len(face), rel_tol=1e-6)


def test_eval_arms_rejects_a_folder_without_identities(arm_and_photos, tmp_path, capsys):
    from headsup_core.cli import main

    root, _ = arm_and_photos
    assert main(["eval-arms", str(root / "arms"), "--data", str(tmp_path), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "has no identities.csv" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "arms_eval.csv").exists()
    assert main(["eval-arms", str(tmp_path), "--data", str(tmp_path), "-o", str(tmp_path / "o")]) == 2
    assert "neither a saved arm" in capsys.readouterr().err


def test_reference_gap_counts_pairs_and_ranks_self_warp_closest(arm_and_photos, tmp_path):
    import importlib.util

    from headsup_core.eval.arms import prepare_pairs

    _, photos = arm_and_photos
    spec = importlib.util.spec_from_file_location(
        "bench_reference_gap", Path(__file__).resolve().parents[1] / "bench" / "reference_gap.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    gap = mod.reference_gap(prepare_pairs(photos, tmp_path / "data", None))
    # img10<->img5 and img44<->img46, both ways; strangers: each of the 4 against the 2 other-person photos
    assert gap["other_photo"]["n"] == 4 and gap["self_warp"]["n"] == 4 and gap["stranger"]["n"] == 8
    assert gap["self_warp"]["mean_db"] > gap["other_photo"]["mean_db"] > 5.0
