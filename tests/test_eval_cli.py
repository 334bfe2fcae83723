"""`headsup eval` end to end on the tiny models; manifest and LQ-folder inputs."""
import argparse
import csv
import json
import shutil

import pytest
from PIL import Image

pytest.importorskip("pyiqa")
pytest.importorskip("insightface")

from headsup_core.eval import cli  # noqa: E402
from headsup_core.eval.runner import load_samples, read_manifest  # noqa: E402
from eval_util import t1_path, t1_small  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models  # built once per session in conftest.py


def _run(argv):
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_eval_all_methods_writes_reports(tiny, tmp_path):
    gt = tmp_path / "gt"
    gt.mkdir()
    shutil.copy(t1_path(), gt / "t1.jpg")
    out = tmp_path / "out"
    rc = _run(["eval", "--gt", str(gt), "--max-side", "160", "--scale", "2",
               "--method", "bicubic,osediff,blend,headsup", "--base", str(tiny["base"]),
               "--weights", str(tiny["headsup"]), "--osediff-weights", str(tiny["osediff"]),
               "--face-models", str(tiny["insightface_root"]), "--face-pack", "tiny",
               "--metrics-root", str(tmp_path / "no-weights"), "-o", str(out)])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "results.csv", encoding="utf-8")))
    assert [(r["image"], r["method"]) for r in rows] == [
        ("t1", "bicubic"), ("t1", "osediff"), ("t1", "blend"), ("t1", "headsup"),
        ("MEAN", "bicubic"), ("MEAN", "osediff"), ("MEAN", "blend"), ("MEAN", "headsup")]
    for r in rows:
        assert float(r["psnr"]) > 5 and 0 < float(r["ssim"]) <= 1
        assert float(r["seconds"]) >= 0 and float(r["peak_mem_mb"]) > 0
        assert r["face_psnr"] != "" and r["seam"] != ""
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert set(data["means"]) == {"bicubic", "osediff", "blend", "headsup"}
    # nothing could be downloaded: the skipped metrics are named with their missing files
    assert "niqe_modelparameters.mat" in data["notes"]["metric:niqe"]
    assert "crop border 2 px" in data["notes"]["psnr_ssim"]
    assert "Real-ESRGAN" in data["notes"]["lq"]
    md = (out / "results.md").read_text(encoding="utf-8")
    assert md.startswith("| method | psnr") and "| blend |" in md
    assert Image.open(out / "images" / "blend" / "t1.png").size == Image.open(out / "images" / "GT" / "t1.png").size


def test_lq_folder_gives_no_reference_metrics_only(tiny, tmp_path):
    lq = tmp_path / "lq"
    lq.mkdir()
    Image.fromarray(t1_small(64)).save(lq / "a.png")
    out = tmp_path / "out"
    assert _run(["eval", "--lq", str(lq), "--scale", "2", "--method", "bicubic", "--faces", "none",
                 "--metrics", "psnr,niqe", "--metrics-root", str(tmp_path / "m"), "--no-images",
                 "-o", str(out)]) == 0
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert "psnr" not in data["rows"][0] and data["rows"][0]["niqe"] is None
    assert "no GT" in data["notes"]["inputs"]


def test_manifest_pairs_and_split(tmp_path):
    Image.fromarray(t1_small(96)).save(tmp_path / "a.png")
    Image.fromarray(t1_small(64)).save(tmp_path / "b.png")
    lines = [{"path": "a.png", "split": "test", "references": ["b.png"]},
             {"path": "b.png", "split": "train"},
             {"path": "c.png", "split": "test", "reject_reason": "too small"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines), encoding="utf-8")
    recs = read_manifest(tmp_path / "m.jsonl")
    assert [r["gt"].name for r in recs] == ["a.png"] and recs[0]["references"][0].name == "b.png"
    samples, notes = load_samples(manifest=tmp_path / "m.jsonl", scale=4)
    assert samples[0].gt.shape[0] == samples[0].lq.shape[0] * 4
    assert samples[0].references == [str(tmp_path / "b.png")]


def test_missing_face_models_skip_face_metrics_with_a_note(tmp_path):
    gt = tmp_path / "gt"
    gt.mkdir()
    Image.fromarray(t1_small(64)).save(gt / "a.png")
    out = tmp_path / "out"
    assert _run(["eval", "--gt", str(gt), "--scale", "2", "--method", "bicubic", "--metrics", "psnr,id_sim",
                 "--face-models", str(tmp_path / "nowhere"), "--metrics-root", str(tmp_path / "m"),
                 "-o", str(out)]) == 0
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert "face metrics and seam score skipped" in data["notes"]["faces"]
    assert "id_sim" not in data["rows"][0] and data["rows"][0]["psnr"] > 10


def test_manifest_references_reach_headsup(tiny, tmp_path):
    from eval_util import t1_path as _t1

    import os

    d = os.path.dirname(_t1())
    shutil.copy(_t1(), tmp_path / "t1.jpg")
    shutil.copy(os.path.join(d, "Tom_Hanks_54745.png"), tmp_path / "ref.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "t1.jpg", "split": "test", "references": ["ref.png"]}))
    out = tmp_path / "out"
    assert _run(["eval", "--manifest", str(tmp_path / "m.jsonl"), "--reference", "--max-side", "128",
                 "--scale", "2", "--method", "headsup", "--base", str(tiny["base"]), "--weights",
                 str(tiny["headsup"]), "--face-models", str(tiny["insightface_root"]), "--face-pack", "tiny",
                 "--metrics", "psnr", "--metrics-root", str(tmp_path / "m"), "-o", str(out)]) == 0
    row = json.loads((out / "results.json").read_text(encoding="utf-8"))["rows"][0]
    assert isinstance(row["refs_used"], int)  # the reference went through the pipeline's matching
