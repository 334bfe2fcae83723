"""PortraitSR-4K-style dataset builder (``headsup dataset build``).

Per image (cached in ``OUT/cache.jsonl`` as soon as it is done, so an interrupted run resumes):
  read the header -> minimum size and aspect rules -> decode (corrupt files are logged and skipped)
  -> SHA-256 and a DCT perceptual hash -> faces (detector on a downscaled copy, landmarks scaled back)
  -> no-reference quality score (pyiqa).
Then, over the whole set (cheap, recomputed every run): exact duplicates, faces with inter-eye distance below
the threshold, quality percentile, near duplicates (perceptual-hash Hamming distance), identity grouping
(ArcFace cosine >= threshold between faces of *different* images), reference pairs and an identity-disjoint
train/test split. Outputs: ``manifest.jsonl`` (one line per image: stats, status, reject reason, split),
``pairs.jsonl`` (portrait face -> reference image) and ``summary.json``. Sources are only ever read.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..batch import IMAGE_SUFFIXES
from ..errors import HeadsUpError
from .neighbours import UnionFind as _UnionFind
from .neighbours import group_identities, near_duplicates
from .quality import make_pyiqa_scorer

log = logging.getLogger(__name__)
IMAGE_EXTS = IMAGE_SUFFIXES  # the one image-suffix list (batch.py)
RULES = ["corrupt", "min_size", "aspect", "exact_duplicate", "face", "quality", "near_duplicate"]


@dataclass
class BuildOptions:
    min_size: tuple[int, int] = (3840, 2160)   # long side, short side (orientation-free)
    aspect: tuple[float, float] = (0.6, 1.6)    # width / height
    min_eye_distance: float = 64.0
    quality_metric: str = "qalign"              # pyiqa metric name (the paper used Q-Align); "none" disables
    quality_weights: str | None = None          # local weights file for the metric (no downloads needed)
    quality_percentile: float = 10.0            # reject the lowest P % of quality scores
    quality_size: int = 1024                    # images are scored at this long side
    ref_similarity: float = 0.65
    near_dup_bits: int = 6                      # pHash Hamming distance (of 64) that counts as a near duplicate
    test_fraction: float = 0.1
    detect_size: int = 1600                     # faces are detected on a copy with this long side
    seed: int = 0
    device: str | None = None


# ---------------------------------------------------------------- per-image work
def list_images(sources) -> list[Path]:
    out = []
    for s in map(Path, sources):
        if s.is_dir():
            out += [p for p in s.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
        elif s.is_file():
            out.append(s)
        else:
            raise HeadsUpError(f"Source {s} does not exist; pass image files or folders.")
    return sorted({p.resolve() for p in out})


def _header_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        orient = im.getexif().get(0x0112, 1)
    return (h, w) if orient in (5, 6, 7, 8) else (w, h)


def phash(rgb: np.ndarray) -> str:
    """64-bit DCT perceptual hash (the pHash construction: 32x32 grey -> DCT -> 8x8 low band > median)."""
    import cv2

    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    small = cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA)
    low = cv2.dct(small)[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def _downscale(rgb: np.ndarray, long_side: int) -> tuple[np.ndarray, float]:
    import cv2

    s = long_side / max(rgb.shape[:2])
    if s >= 1:
        return rgb, 1.0
    return cv2.resize(rgb, (round(rgb.shape[1] * s), round(rgb.shape[0] * s)), interpolation=cv2.INTER_AREA), s


def _enc(v: np.ndarray | None) -> str | None:
    return None if v is None else base64.b64encode(np.asarray(v, np.float32).tobytes()).decode()


def _dec(s: str | None) -> np.ndarray | None:
    return None if s is None else np.frombuffer(base64.b64decode(s), np.float32)


def check_header(src, rec: dict, opts: BuildOptions) -> dict:
    """Header size (EXIF orientation applied) and the size/aspect rules; ``src`` is a path or a file object."""
    try:
        w, h = _header_size(src)
    except Exception as e:  # PIL raises many kinds for broken files
        return {**rec, "reject": "corrupt", "detail": f"unreadable image header ({type(e).__name__}: {e})"}
    rec = {**rec, "width": w, "height": h, "aspect": round(w / h, 4)}
    if max(w, h) < opts.min_size[0] or min(w, h) < opts.min_size[1]:
        return {**rec, "reject": "min_size", "detail": f"{w}x{h} is below {opts.min_size[0]}x{opts.min_size[1]}"}
    if not opts.aspect[0] <= w / h <= opts.aspect[1]:
        return {**rec, "reject": "aspect", "detail": f"aspect {w / h:.3f} outside {opts.aspect[0]}-{opts.aspect[1]}"}
    return rec


def decode_and_hash(data: bytes, rec: dict) -> tuple[dict, np.ndarray | None]:
    """(record with sha256 and pHash, full-resolution RGB); a file that does not decode gives (reject, None)."""
    import io

    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except Exception as e:
        return {**rec, "reject": "corrupt", "detail": f"cannot decode ({type(e).__name__}: {e})"}, None
    return {**rec, "sha256": hashlib.sha256(data).hexdigest(), "phash": phash(rgb)}, rgb


def detect_faces(small: np.ndarray, s: float, analyzer, identity=None) -> tuple[list[dict], str | None]:
    """Faces found on the downscaled copy ``small`` (scale ``s``), in full-image pixels; and the identity model.
    ``identity`` (an ``IdentityEmbedder``): embeds all faces of the image in one batch; None: the analyzer's own."""
    faces = []
    found = analyzer.detect(np.ascontiguousarray(small)) if analyzer is not None else []
    embs = identity.embed_many(small, [f.kps for f in found]) if identity is not None and found else None
    for n, f in enumerate(found):
        kps = np.asarray(f.kps, np.float32) / s
        faces.append({"bbox": [round(float(v) / s, 2) for v in f.bbox], "kps": np.round(kps, 2).tolist(),
                      "det_score": round(float(f.det_score), 4),
                      "eye_distance": round(float(np.linalg.norm(kps[1] - kps[0])), 2),
                      "embedding": _enc(embs[n] if embs is not None else getattr(f, "embedding", None))})
    kind = None
    if identity is not None and analyzer is not None:
        kind = identity.kind
    elif analyzer is not None and getattr(analyzer, "has_recognizer", False):
        kind = getattr(analyzer, "identity_kind", "arcface")
    return faces, kind


def analyse_image(path: Path, opts: BuildOptions, analyzer, scorer, identity=None) -> dict:
    """Everything the rules need about one image; never raises for a bad file (it becomes a reject).
    The stages (``check_header``, ``decode_and_hash``, ``detect_faces``, the scorer) are shared with the Ray
    engine (``dataset_ray``), which runs them as separate operators."""
    st = path.stat()
    rec = check_header(path, {"path": str(path), "bytes": st.st_size, "mtime": st.st_mtime}, opts)
    if "reject" in rec:
        return rec
    rec, rgb = decode_and_hash(path.read_bytes(), rec)
    if rgb is None:
        return rec
    rec["faces"], kind = detect_faces(*_downscale(rgb, opts.detect_size), analyzer, identity)
    if kind:
        rec["identity_model"] = kind
    if scorer is not None:
        rec["quality"] = float(scorer(_downscale(rgb, opts.quality_size)[0]))
    return rec


# ---------------------------------------------------------------- whole-set rules
def split_groups(groups: dict[int, list[int]], test_fraction: float, seed: int) -> dict[int, str]:
    """Whole identity groups go to test (seeded order) until the test fraction of images is reached."""
    rng = np.random.default_rng(seed)
    keys = sorted(groups)
    rng.shuffle(keys)
    total = sum(len(v) for v in groups.values())
    out, n_test = {}, 0
    for k in keys:
        to_test = n_test + len(groups[k]) <= round(test_fraction * total) and test_fraction > 0
        n_test += len(groups[k]) if to_test else 0
        for i in groups[k]:
            out[i] = "test" if to_test else "train"
    return out


# ---------------------------------------------------------------- the build
def _cache_key(opts: BuildOptions, quality_note: str, analyzer, identity=None) -> str:
    keep = (opts.min_size, opts.aspect, opts.detect_size, opts.quality_size, quality_note,
            type(analyzer).__name__ if analyzer is not None else None)
    if identity is not None:
        keep += (identity.kind,)
    return hashlib.sha1(json.dumps(keep, default=str).encode()).hexdigest()[:12]


def _load_cache(path: Path, key: str) -> dict[str, dict]:
    cache = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by an interruption
                continue
            if r.get("key") == key:
                cache[r["path"]] = r
    return cache


def _fresh(r: dict | None, p: Path) -> bool:
    if r is None:
        return False
    st = p.stat()
    return r["bytes"] == st.st_size and r["mtime"] == st.st_mtime


def build_dataset(sources, out, opts: BuildOptions | None = None, analyzer=None, scorer="auto",
                  progress: bool = True, identity=None) -> dict:
    """Build (or resume) the dataset in ``out``; returns the summary. See the module docstring. ``identity``
    (``faces.identity_net.IdentityEmbedder``): the identity network for the face embeddings, batched per
    image; None: the analyzer's own recognizer."""
    from tqdm import tqdm

    opts = opts or BuildOptions()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = list_images(sources)
    if scorer == "auto":
        scorer, q_note = make_pyiqa_scorer(opts.quality_metric, opts.quality_weights, opts.device)
    else:
        q_note = "custom scorer" if scorer is not None else "quality rule disabled"
    if scorer is None:
        log.warning(q_note)
    key = _cache_key(opts, q_note, analyzer, identity)
    cache_path = out / "cache.jsonl"
    cache = _load_cache(cache_path, key)
    todo = [p for p in files if not _fresh(cache.get(str(p)), p)]
    with cache_path.open("a") as fh:
        for p in tqdm(todo, desc="analysing images", disable=not progress or not todo):
            rec = {**analyse_image(p, opts, analyzer, scorer, identity), "key": key}
            if rec.get("reject") == "corrupt":
                log.warning("skipping %s: %s", p, rec["detail"])
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            cache[str(p)] = rec
    recs = [dict(cache[str(p)]) for p in files]
    summary = apply_rules(recs, opts, q_note)
    summary["analysed_this_run"] = len(todo)
    _write_outputs(out, recs, summary)
    return summary


def _reject(r, reason, detail):
    r["reject"], r["detail"] = reason, detail


def exact_duplicates(hashes: dict[int, str]) -> dict[int, int]:
    """{dropped index: kept index} over {record index: SHA-256}: the first index (sorted path) of a hash stays."""
    first: dict[str, int] = {}
    return {i: first[h] for i, h in sorted(hashes.items()) if first.setdefault(h, i) != i}


def apply_rules(recs: list[dict], opts: BuildOptions, q_note: str, near_fn=None, link_fn=None,
                exact_fn=None) -> dict:
    """The whole-set rules. ``near_fn``/``link_fn``/``exact_fn`` replace ``near_duplicates``/
    ``group_identities``/``exact_duplicates`` with equivalents of the same signature (the Ray engine passes
    the nearest-neighbour ones of ``neighbours`` and a Ray Data group-by)."""
    near_fn, link_fn = near_fn or near_duplicates, link_fn or group_identities
    for i, j in (exact_fn or exact_duplicates)({i: r["sha256"] for i, r in enumerate(recs)
                                                if "reject" not in r}).items():
        _reject(recs[i], "exact_duplicate", f"same bytes as {recs[j]['path']}")
    for r in recs:
        if "reject" in r:
            continue
        best = max((f["eye_distance"] for f in r["faces"]), default=0.0)
        if best < opts.min_eye_distance:
            _reject(r, "face", f"no face with inter-eye distance >= {opts.min_eye_distance:g} px "
                               f"({len(r['faces'])} faces, largest {best:.1f} px)")
    live = [r for r in recs if "reject" not in r and r.get("quality") is not None]
    cutoff = None
    if live and opts.quality_percentile > 0:
        lower_better = "lower is better" in q_note
        q = np.array([r["quality"] for r in live])
        cutoff = float(np.percentile(q, 100 - opts.quality_percentile if lower_better else opts.quality_percentile))
        for r in live:
            if (r["quality"] > cutoff) if lower_better else (r["quality"] < cutoff):
                _reject(r, "quality", f"quality {r['quality']:.4g} beyond the {opts.quality_percentile:g}th "
                                      f"percentile cutoff {cutoff:.4g}")
    live_idx = [i for i, r in enumerate(recs) if "reject" not in r]
    order = sorted(live_idx, key=lambda i: (-(recs[i].get("quality") or 0.0),
                                            -recs[i]["width"] * recs[i]["height"], recs[i]["path"]))
    pos = {i: n for n, i in enumerate(live_idx)}
    for i, j in near_fn([recs[i]["phash"] for i in live_idx], [pos[i] for i in order],
                                opts.near_dup_bits).items():
        _reject(recs[live_idx[i]], "near_duplicate", f"perceptual hash within {opts.near_dup_bits} bits of "
                                                     f"{recs[live_idx[j]]['path']}")
    kept = [i for i, r in enumerate(recs) if "reject" not in r]
    # identity grouping over portrait-size faces of kept images
    fimg, fidx, embs = [], [], []
    for i in kept:
        for k, f in enumerate(recs[i]["faces"]):
            e = _dec(f.get("embedding"))
            if e is not None and f["eye_distance"] >= opts.min_eye_distance:
                fimg.append(i), fidx.append(k), embs.append(e / max(np.linalg.norm(e), 1e-8))
    kind = next((recs[i]["identity_model"] for i in kept if recs[i].get("identity_model")), "arcface")
    ids, links = (link_fn(np.array(fimg), np.stack(embs), opts.ref_similarity, identity_kind=kind)
                  if embs else ([], []))
    img_uf = _UnionFind(len(recs))
    for a, b, _ in links:
        img_uf.union(fimg[a], fimg[b])
    for n, (i, k) in enumerate(zip(fimg, fidx)):
        recs[i]["faces"][k]["identity"] = int(ids[n])
    groups: dict[int, list[int]] = {}
    for i in kept:
        groups.setdefault(img_uf.find(i), []).append(i)
    split = split_groups(groups, opts.test_fraction, opts.seed)
    pairs = []
    for a, b, sim in links:
        for p, q in ((a, b), (b, a)):
            pairs.append({"portrait": recs[fimg[p]]["path"], "face": fidx[p], "reference": recs[fimg[q]]["path"],
                          "reference_face": fidx[q], "similarity": round(sim, 4), "split": split[fimg[p]]})
    n_refs: dict[str, int] = {}
    for p in pairs:
        n_refs[p["portrait"]] = n_refs.get(p["portrait"], 0) + 1
    for i in kept:
        recs[i]["split"] = split[i]
        recs[i]["n_references"] = n_refs.get(recs[i]["path"], 0)
    counts = {rule: sum(1 for r in recs if r.get("reject") == rule) for rule in RULES}
    return {"total": len(recs), "kept": len(kept), "rejected": counts, "quality": q_note, "quality_cutoff": cutoff,
            "train": sum(1 for i in kept if split[i] == "train"), "test": sum(1 for i in kept if split[i] == "test"),
            "identities": len(set(ids)), "pairs": pairs, "identity_model": kind if embs else None,
            "identity_note": None if embs or not kept else "no face embeddings (detector without recognizer): "
                                                             "split is per image, no reference pairs",
            "options": {k: v for k, v in asdict(opts).items() if k != "device"}}


def _write_atomic(path: Path, text: str):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_outputs(out: Path, recs: list[dict], summary: dict):
    lines = []
    for r in recs:
        r = {k: v for k, v in r.items() if k not in ("key", "mtime")}
        r["status"] = "rejected" if "reject" in r else "kept"
        for f in r.get("faces", []):
            f.pop("embedding", None)
        lines.append(json.dumps(r, sort_keys=True))
    _write_atomic(out / "manifest.jsonl", "\n".join(lines) + "\n")
    pairs = summary.pop("pairs")
    _write_atomic(out / "pairs.jsonl", "".join(json.dumps(p, sort_keys=True) + "\n" for p in pairs))
    summary["pairs"] = {"train": sum(p["split"] == "train" for p in pairs),
                        "test": sum(p["split"] == "test" for p in pairs)}
    _write_atomic(out / "summary.json", json.dumps({k: v for k, v in summary.items()
                                                    if k != "analysed_this_run"}, indent=1, sort_keys=True))


def format_summary(s: dict) -> str:
    rows = [("images found", s["total"])] + [(f"rejected: {k}", v) for k, v in s["rejected"].items()] + \
        [("kept", s["kept"]), ("  train", s["train"]), ("  test", s["test"]), ("identities", s["identities"]),
         ("reference pairs (train/test)", f"{s['pairs']['train']}/{s['pairs']['test']}"),
         ("analysed this run", s.get("analysed_this_run", "-"))]
    w = max(len(r[0]) for r in rows)
    lines = [f"{k.ljust(w)}  {v}" for k, v in rows] + [f"quality: {s['quality']}"]
    if s.get("identity_note"):
        lines.append(f"identity: {s['identity_note']}")
    return "\n".join(lines)
