"""Dataset builder: every rule rejects with its reason, resume is a no-op, identity-disjoint split."""

import hashlib
import json
import logging
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headsup_core.train.dataset import BuildOptions, build_dataset, format_summary, phash

MAGIC = (45, 123)  # marker pixel values that tell the stub analyzer "this synthetic image has a face"


class StubFace:
    def __init__(self, ident, eye, h, w):
        cx, cy = w / 2, h / 2
        self.kps = np.array([[cx - eye / 2, cy], [cx + eye / 2, cy], [cx, cy + 5], [cx - 5, cy + 10],
                             [cx + 5, cy + 10]], np.float32)
        self.bbox = np.array([cx - eye, cy - eye, cx + eye, cy + eye], np.float32)
        self.det_score = 0.9
        e = np.zeros(16, np.float32)
        e[ident % 16] = 1.0
        self.embedding = e


class StubAnalyzer:
    """Reads identity (R) and inter-eye distance (G) from pixel (1,0) when pixel (0,0) carries the marker."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def detect(self, rgb):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt  # simulates the user stopping the run
        if tuple(rgb[0, 0, :2]) != MAGIC:
            return []
        return [StubFace(int(rgb[0, 1, 0]), float(rgb[0, 1, 1]), *rgb.shape[:2])]


def quality(rgb):
    return float(rgb[0, 2, 2])  # B of pixel (2,0)


def synth(path, w, h, ident=None, eye=40, q=200, seed=0):
    rgb = np.random.default_rng(seed).integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BICUBIC)).copy()
    if ident is not None:
        rgb[0, 0, :2] = MAGIC
        rgb[0, 1, :2] = (ident, eye)
    rgb[0, 2, 2] = q
    Image.fromarray(rgb).save(path)


def _real_photo():
    import insightface

    return Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"


@pytest.fixture()
def src(tmp_path):
    d = tmp_path / "src"
    (d / "sub").mkdir(parents=True)
    for k, (i, w, h) in enumerate([(1, 128, 128), (1, 128, 96), (2, 96, 128), (2, 128, 128), (3, 128, 100),
                                   (4, 120, 128), (5, 128, 128), (6, 128, 128), (8, 100, 128), (9, 128, 128)]):
        synth(d / f"id{i}_{k}.png", w, h, ident=i, seed=k)
    synth(d / "small.png", 64, 48, ident=10, seed=20)
    synth(d / "wide.png", 256, 96, ident=11, seed=21)
    synth(d / "noface.png", 128, 128, seed=22)
    synth(d / "smallface.png", 128, 128, ident=12, eye=10, seed=23)
    synth(d / "lowq.png", 128, 128, ident=13, q=0, seed=24)
    (d / "sub" / "dup.png").write_bytes((d / "id3_4.png").read_bytes())
    near = np.asarray(Image.open(d / "id4_5.png")).copy()
    near[64:, 64:] = np.clip(near[64:, 64:].astype(int) + 3, 0, 255)  # a re-encode-like tiny change
    Image.fromarray(near).save(d / "sub" / "near.png")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    data = (d / "id5_6.png").read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.open(_real_photo()).save(d / "real_t1.jpg")
    return d


def _opts():
    return BuildOptions(min_size=(96, 64), aspect=(0.6, 1.6), min_eye_distance=20, quality_percentile=10,
                        quality_size=4096, detect_size=4096, near_dup_bits=6, test_fraction=0.3, seed=1)


def _digest(folder):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_rules_reasons_resume_and_split(src, tmp_path, caplog):
    before = _digest(src)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        s = build_dataset([src], out, _opts(), analyzer=StubAnalyzer(), scorer=quality, progress=False)
    recs = {Path(r["path"]).name: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert len(recs) == 20 and s["total"] == 20
    expect = {"small.png": "min_size", "wide.png": "aspect", "noface.png": "face", "smallface.png": "face",
              "lowq.png": "quality", "dup.png": "exact_duplicate", "near.png": "near_duplicate",
              "corrupt.jpg": "corrupt", "truncated.png": "corrupt", "real_t1.jpg": "face"}
    for name, reason in expect.items():
        assert recs[name]["status"] == "rejected" and recs[name]["reject"] == reason, (name, recs[name])
        assert recs[name]["detail"]
    assert "id3_4.png" in recs["dup.png"]["detail"] and "id4_5.png" in recs["near.png"]["detail"]
    kept = [n for n, r in recs.items() if r["status"] == "kept"]
    assert sorted(kept) == sorted(n for n in recs if n.startswith("id"))
    assert s["rejected"] == {"corrupt": 2, "min_size": 1, "aspect": 1, "exact_duplicate": 1, "face": 3,
                             "quality": 1, "near_duplicate": 1}
    assert any("corrupt.jpg" in m for m in caplog.messages) and any("truncated.png" in m for m in caplog.messages)
    # per-image stats are recorded
    r = recs["id1_0.png"]
    assert r["width"] == 128 and r["quality"] == 200 and r["faces"][0]["eye_distance"] == pytest.approx(40)
    assert len(r["phash"]) == 16 and len(r["sha256"]) == 64
    # reference pairs: same identity across different images, both directions
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    names = {(Path(p["portrait"]).name, Path(p["reference"]).name) for p in pairs}
    assert names == {("id1_0.png", "id1_1.png"), ("id1_1.png", "id1_0.png"),
                     ("id2_2.png", "id2_3.png"), ("id2_3.png", "id2_2.png")}
    assert all(p["similarity"] == pytest.approx(1.0) for p in pairs)
    # identity-disjoint split, with both splits used
    by_id = {}
    for n in kept:
        for f in recs[n]["faces"]:
            by_id.setdefault(f["identity"], set()).add(recs[n]["split"])
    assert all(len(v) == 1 for v in by_id.values())
    assert {recs[n]["split"] for n in kept} == {"train", "test"}
    assert "quality" in format_summary(s) and "kept" in format_summary(s)
    # re-running is a no-op: nothing analysed again, same manifest, sources untouched
    manifest = (out / "manifest.jsonl").read_bytes()
    stub = StubAnalyzer()
    s2 = build_dataset([src], out, _opts(), analyzer=stub, scorer=quality, progress=False)
    assert s2["analysed_this_run"] == 0 and stub.calls == 0
    assert (out / "manifest.jsonl").read_bytes() == manifest
    assert _digest(src) == before


def test_interrupted_run_resumes(src, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        build_dataset([src], out, _opts(), analyzer=StubAnalyzer(fail_after=4), scorer=quality, progress=False)
    done = len((out / "cache.jsonl").read_text().splitlines())
    assert done >= 4
    stub = StubAnalyzer()
    s = build_dataset([src], out, _opts(), analyzer=stub, scorer=quality, progress=False)
    assert s["analysed_this_run"] == 20 - done and s["kept"] == 10


def test_missing_quality_weights_skip_rule_with_note(src, tmp_path, monkeypatch):
    pyiqa = pytest.importorskip("pyiqa")

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(pyiqa, "create_metric", offline)
    s = build_dataset([src], tmp_path / "o", _opts(), analyzer=StubAnalyzer(), progress=False)
    assert s["rejected"]["quality"] == 0 and "skipped" in s["quality"] and "qalign" in s["quality"]


def test_phash_near_and_far():
    rng = np.random.default_rng(0)
    a = np.asarray(Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize((128, 128)))
    b = np.clip(a.astype(int) + 2, 0, 255).astype(np.uint8)
    c = a[:, ::-1].copy()
    d = lambda x, y: bin(int(phash(x), 16) ^ int(phash(y), 16)).count("1")  # noqa: E731
    assert d(a, b) <= 2 and d(a, c) > 10


def test_real_tiny_insightface_pack(tmp_path):
    """Real insightface loading/decoding (tiny deterministic pack): faces, embeddings and identity links."""
    from headsup_core.faces import load_face_analyzer
    from headsup_core.testing.tiny_faces import write_tiny_face_models

    write_tiny_face_models(tmp_path / "m")
    an = load_face_analyzer("insightface", model_root=tmp_path / "m" / "insightface", pack="tiny")
    tom = Image.open(resources.files("insightface").joinpath("data/images/Tom_Hanks_54745.png")).convert("RGB")
    astro = Image.open(_real_photo()).convert("RGB").crop((0, 0, 400, 400))
    d = tmp_path / "src"
    d.mkdir()
    tom.resize((256, 256), Image.BICUBIC).save(d / "tom.png")
    pair = Image.new("RGB", (512, 256))
    pair.paste(tom.resize((256, 256), Image.LANCZOS), (0, 0))
    pair.paste(astro.resize((256, 256)), (256, 0))
    pair.save(d / "tom_and_other.png")
    astro.resize((300, 300)).save(d / "other.png")
    opts = BuildOptions(min_size=(200, 200), aspect=(0.4, 2.5), min_eye_distance=40, quality_metric="none",
                        test_fraction=0.5, seed=0)
    s = build_dataset([d], tmp_path / "out", opts, analyzer=an, progress=False)
    lines = (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()
    recs = {Path(r["path"]).name: r for r in map(json.loads, lines)}
    assert len(recs["tom_and_other.png"]["faces"]) == 2 and s["kept"] == 3
    assert recs["tom.png"]["split"] == recs["tom_and_other.png"]["split"]  # same person -> same side
    pairs = [json.loads(line) for line in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    assert any(Path(p["portrait"]).name == "tom.png" and Path(p["reference"]).name == "tom_and_other.png"
               for p in pairs)
