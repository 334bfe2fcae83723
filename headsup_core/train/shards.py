"""WebDataset shards of the curated set, and the parquet manifest. The ``webdataset`` library (the ``scale``
extra) writes and reads the tars.

Layout (the WebDataset convention): ``OUT/shards/NNNNNN.tar`` holding ``KEY.json`` then ``KEY.EXT`` (the source
file's bytes, unchanged) per kept image; ``wds.WebDataset`` reads them as samples ``{"json", EXT}``. ``KEY`` is a
global 9-digit index over the kept images in manifest order. The JSON has the manifest record (source ``path``,
size, hashes, ``faces`` with bbox/kps/eye distance/``identity``, ``quality``, ``split``) plus ``key``, ``shard``
and ``references``: ``{face index: [[reference key, reference face index, reference kps], ...]}`` from the pairs.
``OUT/manifest.parquet`` has one row per input image (kept and rejected) with ``shard``/``key`` for kept ones and
the faces as a JSON string.

``OUT/shards/index.json`` records per shard its content digest (a re-run does not rewrite an unchanged shard)
and the byte offset of each sample's first tar header, taken from the writer as it writes. The trainer needs
random access: a global batch is a pure function of the step (``data.StepBatches``), which gives equal batches
for any process count and an exact ``--resume`` without loader state; a stream split by node and worker would
give neither. So a sample is read by seeking to its offset and letting webdataset's tar iterator parse the
members from there (the JSON first, so indexing a shard never reads its images).
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

from ..errors import HeadsUpError, MissingDependencyError

SHARD_SIZE = 1000


def _wds():
    try:
        import webdataset
    except ImportError as e:
        raise MissingDependencyError('WebDataset shards need webdataset; run `pip install "comfyui-headsup[scale]"`.') \
            from e
    return webdataset


def read_members(tar, offset: int, count: int) -> list[tuple[str, bytes]]:
    """``count`` members (name, bytes) of ``tar`` from the one whose header starts at ``offset``; webdataset's
    tar iterator parses them, reading nothing past the last one asked for."""
    tar_file_iterator = _wds().tariterators.tar_file_iterator
    out = []
    with open(tar, "rb") as fh:
        fh.seek(offset)
        try:
            for member in tar_file_iterator(fh):
                out.append((member["fname"], member["data"]))
                if len(out) == count:
                    break
        except (tarfile.TarError, ValueError) as e:
            raise OSError(f"{tar}: no tar member at offset {offset} ({e})") from e
    return out


def read_bytes(item: dict) -> bytes:
    if "member_offset" not in item:
        with open(item["path"], "rb") as fh:
            return fh.read()
    tar, _, name = item["path"].rpartition("#")
    found = read_members(tar, item["member_offset"], 1)
    if not found or found[0][0] != name:
        raise OSError(f"{tar} changed: no member {name} at offset {item['member_offset']}")
    return found[0][1]


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
            j = {k: v for k, v in r.items() if k not in ("key", "mtime", "member_offset", "status")}
            j["faces"] = [{k: v for k, v in f.items() if k != "embedding"} for f in r.get("faces", [])]
            j.update(key=keys[r["path"]], shard=name,
                     references={str(k): refs[(r["path"], k)] for k in range(len(r.get("faces", [])))
                                 if (r["path"], k) in refs})
            item = {"path": r["path"], "bytes": r["bytes"]}
            if r.get("member_offset") is not None:
                item["member_offset"] = r["member_offset"]
            items.append((item, j))
        plans.append({"shard": name, "items": items,
                      "digest": hashlib.sha1(json.dumps([j for _, j in items], sort_keys=True).encode())
                      .hexdigest()})
    return plans


def _ext(path: str) -> str:
    return path.rpartition(".")[2].lower() if "." in path.rpartition("/")[2] else "jpg"


def write_shard(folder: Path, plan: dict) -> dict:
    """Write one shard (atomically); returns {"shard", "digest", "images", "offsets": {key: sample offset}}."""
    wds = _wds()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (plan["shard"] + ".tmp")
    offsets = {}
    with open(tmp, "wb") as fh, wds.TarWriter(fh, encoder=False, mode=0o644) as sink:
        for item, j in plan["items"]:
            offsets[j["key"]] = sink.tarstream.offset  # where this sample's first header starts
            # two writes of one key: the JSON member goes first, so reading it never touches the image
            sink.write({"__key__": j["key"], "json": json.dumps(j, sort_keys=True).encode()})
            sink.write({"__key__": j["key"], _ext(item["path"].rpartition("#")[2]): read_bytes(item)})
    os.replace(tmp, folder / plan["shard"])
    return {"shard": plan["shard"], "digest": plan["digest"], "images": len(plan["items"]), "offsets": offsets}


def write_shards(out: Path, recs: list[dict], pairs: list[dict], shard_size: int = SHARD_SIZE,
                 map_fn=None) -> dict:
    """Write the shards that are missing or changed (``map_fn(fn, plans)`` may run them in parallel, e.g. on
    Ray) and the parquet manifest; returns {"shards": n, "written": n}."""
    folder = Path(out) / "shards"
    index_file = folder / "index.json"
    old = json.loads(index_file.read_text()) if index_file.is_file() else {}
    plans = plan_shards(recs, pairs, shard_size)
    todo = [p for p in plans if old.get(p["shard"], {}).get("digest") != p["digest"]
            or "offsets" not in old[p["shard"]] or not (folder / p["shard"]).is_file()]
    done = list((map_fn or (lambda f, xs: [f(x) for x in xs]))(lambda p: write_shard(folder, p), todo))
    index = {p["shard"]: old[p["shard"]] for p in plans if p not in todo}
    index.update({d["shard"]: {k: v for k, v in d.items() if k != "shard"} for d in done})
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
    """{key: {"tar", "offset", "json": record}} over shard files or folders of them, from the builder's
    ``index.json`` beside them (each sample's JSON member is read, its image is not)."""
    files = []
    for s in map(Path, shards if isinstance(shards, (list, tuple)) else [shards]):
        files += sorted(s.glob("*.tar")) if s.is_dir() else [s]
    indexes: dict[Path, dict] = {}
    out = {}
    for f in files:
        if f.parent not in indexes:
            idx_file = f.parent / "index.json"
            indexes[f.parent] = json.loads(idx_file.read_text()) if idx_file.is_file() else {}
        offsets = indexes[f.parent].get(f.name, {}).get("offsets")
        if offsets is None:
            raise HeadsUpError(f"Shard {f} has no sample offsets in {f.parent / 'index.json'}; rebuild the shards "
                               "with `headsup dataset build` (--engine ray, or --shard-size N).")
        for key, off in sorted(offsets.items()):
            try:
                found = read_members(f, off, 1)
            except OSError:
                found = []
            if not found or found[0][0] != f"{key}.json":
                raise HeadsUpError(f"Shard {f} does not match its index.json (no {key}.json at offset {off}); "
                                   "rebuild the shards.")
            out[key] = {"tar": str(f), "offset": off, "json": json.loads(found[0][1])}
    return out


def shard_member_path(entry: dict) -> str:
    """A path string the training reader understands: ``SHARD.tar#OFFSET`` (the sample's offset)."""
    return f"{entry['tar']}#{entry['offset']}"


def read_member(path: str) -> bytes:
    """The image bytes of the sample at ``SHARD.tar#OFFSET`` (its JSON member, then its image)."""
    tar, _, off = path.rpartition("#")
    return read_members(tar, int(off), 2)[-1][1]
