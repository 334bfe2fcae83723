"""WebDataset shards of the curated set, and the parquet manifest.

Layout (the WebDataset convention, readable by ``webdataset``/``img2dataset`` tools): ``OUT/shards/NNNNNN.tar``
holding ``KEY.EXT`` (the source file's bytes, unchanged) and ``KEY.json`` per kept image. ``KEY`` is a
global 9-digit index over the kept images in manifest order. The JSON has the manifest record (source ``path``,
size, hashes, ``faces`` with bbox/kps/eye distance/``identity``, ``quality``, ``split``) plus ``key``, ``shard``
and ``references``: ``{face index: [[reference key, reference face index, reference kps], ...]}`` from the pairs.
``OUT/manifest.parquet`` has one row per input image (kept and rejected) with ``shard``/``key`` for kept ones and
the faces as a JSON string. A shard whose ``.tar`` exists with the same member list (``shards/index.json``) is
not rewritten on a re-run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path

SHARD_SIZE = 1000


def plan_shards(recs: list[dict], pairs: list[dict], shard_size: int = SHARD_SIZE) -> list[dict]:
    """[{"shard": name, "items": [(source item, json record)]}] for the kept records (in order)."""
    kept = [r for r in recs if r.get("status", "kept" if "reject" not in r else "rejected") == "kept"]
    keys = {r["path"]: f"{n:09d}" for n, r in enumerate(kept)}
    refs: dict[tuple[str, int], list] = {}
    by_path = {r["path"]: r for r in kept}
    for p in pairs:
        ref = by_path.get(p["reference"])
        if ref is not None and p["portrait"] in keys:
            refs.setdefault((p["portrait"], p["face"]), []).append(
                [keys[p["reference"]], p["reference_face"], ref["faces"][p["reference_face"]]["kps"]])
    plans = []
    for s in range(0, len(kept), max(1, shard_size)):
        name = f"{s // max(1, shard_size):06d}.tar"
        items = []
        for r in kept[s:s + shard_size]:
            j = {k: v for k, v in r.items() if k not in ("key", "mtime", "offset", "status")}
            j["faces"] = [{k: v for k, v in f.items() if k != "embedding"} for f in r.get("faces", [])]
            j.update(key=keys[r["path"]], shard=name,
                     references={str(k): refs[(r["path"], k)] for k in range(len(r.get("faces", [])))
                                 if (r["path"], k) in refs})
            item = {"path": r["path"], "bytes": r["bytes"]}
            if r.get("offset") is not None:
                item["offset"] = r["offset"]
            items.append((item, j))
        plans.append({"shard": name, "items": items,
                      "digest": hashlib.sha1(json.dumps([j for _, j in items], sort_keys=True).encode())
                      .hexdigest()})
    return plans


def _ext(path: str) -> str:
    return path.rpartition(".")[2].lower() if "." in path.rpartition("/")[2] else "jpg"


def write_shard(folder: Path, plan: dict) -> dict:
    """Write one shard (atomically); returns {"shard", "digest", "images"}."""
    from .sources import read_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (plan["shard"] + ".tmp")
    now = time.time()
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
        for item, j in plan["items"]:
            for name, data in ((f"{j['key']}.{_ext(item['path'].rpartition('#')[2])}", read_bytes(item)),
                               (f"{j['key']}.json", json.dumps(j, sort_keys=True).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), now, 0o644
                tf.addfile(info, io.BytesIO(data))
    os.replace(tmp, folder / plan["shard"])
    return {"shard": plan["shard"], "digest": plan["digest"], "images": len(plan["items"])}


def write_shards(out: Path, recs: list[dict], pairs: list[dict], shard_size: int = SHARD_SIZE,
                 map_fn=None) -> dict:
    """Write the shards that are missing or changed (``map_fn(fn, plans)`` may run them in parallel, e.g. on
    Ray) and the parquet manifest; returns {"shards": n, "written": n}."""
    folder = Path(out) / "shards"
    index_file = folder / "index.json"
    old = json.loads(index_file.read_text()) if index_file.is_file() else {}
    plans = plan_shards(recs, pairs, shard_size)
    todo = [p for p in plans if old.get(p["shard"], {}).get("digest") != p["digest"]
            or not (folder / p["shard"]).is_file()]
    done = list((map_fn or (lambda f, xs: [f(x) for x in xs]))(lambda p: write_shard(folder, p), todo))
    index = {p["shard"]: old[p["shard"]] for p in plans if p not in todo}
    index.update({d["shard"]: {"digest": d["digest"], "images": d["images"]} for d in done})
    for stale in set(old) - set(index):
        (folder / stale).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = index_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
    os.replace(tmp, index_file)
    write_parquet_manifest(Path(out) / "manifest.parquet", recs, plans)
    return {"shards": len(plans), "written": len(done)}


def write_parquet_manifest(path: Path, recs: list[dict], plans: list[dict]):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        from ..errors import MissingDependencyError

        raise MissingDependencyError(
            'The parquet manifest needs pyarrow; run `pip install "comfyui-headsup[scale]"`.') from e

    where = {j["path"]: (j["shard"], j["key"]) for p in plans for _, j in p["items"]}
    cols = {k: [] for k in ("path", "status", "reject", "detail", "width", "height", "bytes", "sha256", "phash",
                            "quality", "split", "n_references", "n_faces", "faces", "shard", "key")}
    for r in recs:
        status = "rejected" if "reject" in r else "kept"
        faces = [{k: v for k, v in f.items() if k != "embedding"} for f in r.get("faces", [])]
        vals = {**{k: r.get(k) for k in cols}, "status": status, "n_faces": len(faces),
                "faces": json.dumps(faces), "shard": where.get(r["path"], (None, None))[0],
                "key": where.get(r["path"], (None, None))[1]}
        for k, col in cols.items():
            col.append(vals[k])
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.table(cols), tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------- reading (training)
def index_shards(shards) -> dict[str, dict]:
    """{key: {"tar", "image": (offset, size, ext), "json": record}} over shard files or folders of them."""
    out = {}
    files = []
    for s in map(Path, shards if isinstance(shards, (list, tuple)) else [shards]):
        files += sorted(s.glob("*.tar")) if s.is_dir() else [s]
    for f in files:
        with tarfile.open(f, "r:") as tf:
            for m in tf:
                key, _, ext = m.name.rpartition(".")
                e = out.setdefault(key, {"tar": str(f)})
                if ext == "json":
                    e["json"] = json.loads(tf.extractfile(m).read())
                else:
                    e["image"] = (m.offset_data, m.size, ext)
    return {k: v for k, v in out.items() if "json" in v and "image" in v}


def shard_member_path(entry: dict) -> str:
    """A path string the training reader understands: ``SHARD.tar#OFFSET:SIZE``."""
    off, size, _ = entry["image"]
    return f"{entry['tar']}#{off}:{size}"


def read_member(path: str) -> bytes:
    tar, _, span = path.rpartition("#")
    off, size = (int(v) for v in span.split(":"))
    with open(tar, "rb") as fh:
        fh.seek(off)
        return fh.read(size)
