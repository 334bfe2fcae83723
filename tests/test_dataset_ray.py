"""``headsup dataset build --engine ray`` equals ``--engine local``; shard/list inputs; the faiss neighbour
searches equal the all-pairs ones. Ray runs locally on 2 CPUs with a handful of small real photos."""

import functools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headsup_core.train.dataset import (
    BuildOptions,
    build_dataset,
    group_identities,
    near_duplicates,
)

DEEPFACE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "faces-deepface"


# ---------------------------------------------------------------- neighbour search (no Ray)
def test_near_duplicates_nn_equals_walk():
    from headsup_core.train.neighbours import near_duplicates_nn

    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 60, dtype=np.uint64)
    hs = list(base)
    for k in range(140):  # variants at 0..10 bits from a base hash, so chains and ties occur
        h = int(base[k % 60])
        for b in rng.choice(64, int(rng.integers(0, 11)), replace=False):
            h ^= 1 << int(b)
        hs.append(np.uint64(h))
    hashes = [f"{int(h):016x}" for h in hs]
    order = list(rng.permutation(len(hashes)))
    for bits in (0, 3, 6):
        ref = near_duplicates(hashes, order, bits)
        assert near_duplicates_nn(hashes, order, bits) == ref
        assert near_duplicates_nn(hashes, order, bits, exact_max=0) == ref  # multi-index hashing path
    assert near_duplicates_nn([], [], 6) == {}


def test_group_identities_nn_equals_all_pairs():
    from headsup_core.train.neighbours import group_identities_nn

    pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(25, 128))
    emb = np.concatenate([centres[k % 25] + rng.normal(scale=0.6, size=128)[None] for k in range(300)])
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    face_img = np.array([k // 2 for k in range(300)])  # two faces per image: same-image pairs never link
    for thr, kind in ((0.65, "arcface"), (0.5, "arcface"), (0.65, "dlib")):
        from headsup_core.faces.identity import CALIBRATIONS

        if kind not in CALIBRATIONS and kind != "arcface":  # an identity model this checkout does not know
            continue
        ids, links = group_identities(face_img, emb, thr, identity_kind=kind)
        ids2, links2 = group_identities_nn(face_img, emb, thr, identity_kind=kind)
        assert ids2 == ids
        assert [(a, b) for a, b, _ in links2] == [(a, b) for a, b, _ in links]
        assert np.allclose([s for *_, s in links2], [s for *_, s in links], atol=1e-5)
        assert len(links) > 0


# ---------------------------------------------------------------- Ray engine == local engine
@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    pytest.importorskip("faiss")
    pytest.importorskip("pyarrow")
    pytest.importorskip("webdataset")
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def faces_dir(tmp_path_factory, t1_jpg, tom_hanks_png):
    from headsup_core.testing.tiny_faces import write_tiny_face_models

    root = tmp_path_factory.mktemp("rayds")
    write_tiny_face_models(root / "m")
    d = root / "src"
    (d / "sub").mkdir(parents=True)
    t1 = Image.open(t1_jpg).convert("RGB")
    tom = Image.open(tom_hanks_png).convert("RGB")
    for k, box in enumerate([(0, 0, 400, 400), (300, 0, 700, 400), (600, 200, 1000, 600), (880, 400, 1280, 800)]):
        t1.crop(box).save(d / f"t1_{k}.jpg", quality=92)
    tom.resize((256, 256), Image.BICUBIC).save(d / "tom.png")
    pair = Image.new("RGB", (512, 256))
    pair.paste(tom.resize((256, 256), Image.LANCZOS), (0, 0))
    pair.paste(t1.crop((0, 0, 400, 400)).resize((256, 256)), (256, 0))
    pair.save(d / "tom_and_other.png")
    (d / "sub" / "dup.png").write_bytes((d / "tom.png").read_bytes())
    near = np.asarray(Image.open(d / "tom_and_other.png")).astype(int)
    Image.fromarray(np.clip(near + 2, 0, 255).astype(np.uint8)).save(d / "sub" / "near.png")
    t1.crop((0, 0, 150, 150)).save(d / "small.jpg")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    if DEEPFACE.is_dir():
        for name in sorted(p.name for p in DEEPFACE.glob("img*.jpg"))[:8]:
            im = Image.open(DEEPFACE / name).convert("RGB")
            im.thumbnail((480, 480))
            im.save(d / f"deepface_{name}", quality=92)
    an = functools.partial(_load_tiny, str(root / "m" / "insightface"))
    return {"root": root, "src": d, "factory": an}


def _load_tiny(model_root):
    from headsup_core.faces import load_face_analyzer

    return load_face_analyzer("insightface", model_root=model_root, pack="tiny")


def _mean_quality():
    return lambda rgb: float(rgb.mean())


def _opts():
    return BuildOptions(min_size=(200, 200), aspect=(0.4, 2.5), min_eye_distance=12, quality_percentile=10,
                        quality_size=256, detect_size=640, test_fraction=0.3, ref_similarity=0.5, seed=3)


def _read(out):
    return {n: (out / n).read_text() for n in ("manifest.jsonl", "pairs.jsonl", "summary.json")}


def _identity_factory():
    """The default identity network (dlib's ResNet in torch) when its weights are installed, else None."""
    from headsup_core.faces.identity_net import default_embedder

    return functools.partial(default_embedder, "dlib") if default_embedder("auto") is not None else None


def test_ray_engine_equals_local(ray_session, faces_dir, tmp_path):
    from headsup_core.train.dataset_ray import RayOptions, build_dataset_ray
    from headsup_core.train.shards import index_shards, read_member, shard_member_path

    src, factory, ident = faces_dir["src"], faces_dir["factory"], _identity_factory()
    local = build_dataset([src], tmp_path / "local", _opts(), analyzer=factory(), scorer=_mean_quality(),
                          progress=False, identity=ident() if ident else None)
    ro = RayOptions(batch_size=3, face_actors=1, quality_actors=1, shard_size=4)
    ray_s = build_dataset_ray([src], tmp_path / "ray", _opts(), analyzer_factory=factory, scorer=_mean_quality,
                              ray_options=ro, progress=False, identity_factory=ident)
    assert _read(tmp_path / "ray") == _read(tmp_path / "local")
    assert ray_s["kept"] == local["kept"] >= 5 and ray_s["rejected"] == local["rejected"]
    for rule in ("exact_duplicate", "near_duplicate", "corrupt", "min_size"):
        assert local["rejected"][rule] >= 1, rule
    assert local["pairs"]["train"] + local["pairs"]["test"] >= 2
    # shards: every kept image once, with its JSON; the parquet manifest lists them
    idx = index_shards(tmp_path / "ray" / "shards")
    assert len(idx) == local["kept"] and ray_s["shards"]["shards"] == -(-local["kept"] // 4)
    kept = {json.loads(x)["path"]: json.loads(x) for x in (tmp_path / "local" / "manifest.jsonl").read_text()
            .splitlines() if json.loads(x)["status"] == "kept"}
    for e in idx.values():
        j = e["json"]
        assert j["split"] == kept[j["path"]]["split"]
        assert read_member(shard_member_path(e)) == Path(j["path"]).read_bytes()
    assert any(j["json"]["references"] for j in idx.values())
    # any WebDataset reader sees one sample per kept image: its JSON and the source file's bytes
    import webdataset as wds

    tars = sorted(str(t) for t in (tmp_path / "ray" / "shards").glob("*.tar"))
    streamed = list(wds.WebDataset(tars, shardshuffle=False))
    assert [s["__key__"] for s in streamed] == sorted(idx)
    for s in streamed:
        j = json.loads(s["json"])
        ext = Path(j["path"]).suffix.lower().lstrip(".")
        assert set(s) - {"__key__", "__url__", "__local_path__"} == {"json", ext}
        assert s[ext] == Path(j["path"]).read_bytes() and j == idx[s["__key__"]]["json"]
    import pyarrow.parquet as pq

    t = pq.read_table(tmp_path / "ray" / "manifest.parquet").to_pylist()
    assert len(t) == local["total"] and sum(r["key"] is not None for r in t) == local["kept"]
    # a re-run analyses nothing and rewrites no shard
    again = build_dataset_ray([src], tmp_path / "ray", _opts(), analyzer_factory=factory, scorer=_mean_quality,
                              ray_options=ro, progress=False, identity_factory=ident)
    assert again["analysed_this_run"] == 0 and again["shards"]["written"] == 0
    assert _read(tmp_path / "ray") == _read(tmp_path / "local")


def test_exact_duplicates_group_by_equals_local(ray_session):
    from headsup_core.train.dataset import exact_duplicates
    from headsup_core.train.dataset_ray import RayOptions, exact_duplicates_ray

    rng = np.random.default_rng(4)
    hashes = {int(i): f"{int(v):064x}" for i, v in zip(rng.choice(5000, 600, replace=False), rng.integers(0, 150, 600))}
    ref = exact_duplicates(hashes)
    assert len(ref) > 400 and all(hashes[i] == hashes[j] and j < i for i, j in ref.items())
    assert exact_duplicates_ray(hashes, RayOptions()) == ref
    assert exact_duplicates_ray({7: "ab"}, RayOptions()) == {} and exact_duplicates_ray({}, RayOptions()) == {}


def test_ray_engine_reads_tar_shards_and_lists(ray_session, faces_dir, tmp_path):
    """img2dataset-style shards (KEY.jpg + KEY.json) and a CSV path list give the same decisions as the folder."""
    from headsup_core.train.dataset_ray import RayOptions, build_dataset_ray

    src, factory = faces_dir["src"], faces_dir["factory"]
    files = sorted(p for p in src.rglob("*") if p.is_file())
    shard_dir = tmp_path / "wds"
    shard_dir.mkdir()
    names = {}
    half = len(files) // 2  # keys follow the folder's sorted order, so ties break the same way
    for s in range(2):
        with tarfile.open(shard_dir / f"{s:05d}.tar", "w") as tf:
            for k, p in enumerate(files[:half] if s == 0 else files[half:]):
                key = f"{s:05d}{k:04d}"
                names[key] = p
                tf.add(p, arcname=f"{key}{p.suffix}")
                meta = json.dumps({"caption": f"photo {p.stem}", "key": key}).encode()
                info = tarfile.TarInfo(f"{key}.json")
                info.size = len(meta)
                import io

                tf.addfile(info, io.BytesIO(meta))
    (tmp_path / "list.csv").write_text("path\n" + "".join(f"{p}\n" for p in files))
    ro = RayOptions(batch_size=4, shard_size=0)
    ref = build_dataset([src], tmp_path / "local", _opts(), analyzer=factory(), scorer=_mean_quality(),
                        progress=False)
    build_dataset_ray([tmp_path / "list.csv"], tmp_path / "l", _opts(), analyzer_factory=factory,
                                scorer=_mean_quality, ray_options=ro, progress=False)
    assert _read(tmp_path / "l") == _read(tmp_path / "local")
    by_tar = build_dataset_ray([shard_dir], tmp_path / "t", _opts(), analyzer_factory=factory,
                               scorer=_mean_quality, ray_options=ro, progress=False)
    for k in ("kept", "rejected", "train", "test", "identities", "pairs"):  # same decisions from shards
        assert by_tar[k] == ref[k], k
    recs = [json.loads(x) for x in (tmp_path / "t" / "manifest.jsonl").read_text().splitlines()]
    local = {Path(json.loads(x)["path"]).name: json.loads(x)
             for x in (tmp_path / "local" / "manifest.jsonl").read_text().splitlines()}
    for r in recs:
        key = r["path"].rpartition("#")[2].rpartition(".")[0]
        twin = local[names[key].name]
        assert (r["status"], r.get("reject"), r.get("split")) == (twin["status"], twin.get("reject"),
                                                                    twin.get("split"))
        assert r.get("caption") == f"photo {names[key].stem}"


def test_cli_engine_flag_without_ray_names_the_extra(monkeypatch, tmp_path):
    import builtins

    from headsup_core.errors import MissingDependencyError
    from headsup_core.train.dataset_ray import _ray

    real = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("no ray")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(MissingDependencyError, match=r"comfyui-headsup\[scale\]"):
        _ray()


def test_cli_passes_ray_options_and_local_writes_shards_on_request(monkeypatch, tmp_path, capsys):
    """``--engine ray`` reaches build_dataset_ray with the options (faces as a factory, not a loaded model);
    ``--engine local --shard-size N`` writes the same kind of shards."""
    pytest.importorskip("pyarrow")
    import headsup_core.train.dataset_ray as R
    from headsup_core.cli import main
    from headsup_core.train.shards import index_shards

    seen = {}

    def fake(sources, out, opts, analyzer_factory=None, ray_options=None, progress=True, identity_factory=None):
        seen.update(sources=sources, factory=analyzer_factory, ro=ray_options)
        return build_dataset(sources, out, opts, analyzer=None, scorer=None, progress=False)

    monkeypatch.setattr(R, "build_dataset_ray", fake)
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (300, 300), (90, 40, 20)).save(src / "a.png")
    args = ["dataset", "build", str(src), str(tmp_path / "o"), "--engine", "ray", "--faces", "none",
            "--quality-metric", "none", "--ray-address", "auto", "--batch-size", "4", "--face-actors", "3",
            "--gpus-per-actor", "0.5", "--no-progress"]
    assert main(args) == 0
    ro = seen["ro"]
    assert (ro.address, ro.batch_size, ro.face_actors, ro.gpus_per_actor, ro.shard_size) == ("auto", 4, 3, 0.5,
                                                                                            1000)
    assert seen["factory"] is None and "images found" in capsys.readouterr().out
    # the local engine with shards: only kept images go in (here none: no faces), the parquet lists every image
    assert main(["dataset", "build", str(src), str(tmp_path / "l"), "--faces", "none", "--quality-metric", "none",
                 "--shard-size", "10", "--no-progress"]) == 0
    assert (tmp_path / "l" / "manifest.parquet").is_file() and index_shards(tmp_path / "l" / "shards") == {}
