"""Inputs of the dataset builder: folders and image files, WebDataset tar shards as ``img2dataset`` writes them
(``KEY.jpg`` with ``KEY.json``/``KEY.txt`` members), and parquet/CSV lists of local paths (a ``path`` column, or
``filepath``/``file``/the first column). Nothing is downloaded: fetch URL lists into shards with ``img2dataset``.

An item is a small dict: ``path`` (a file, or ``SHARD.tar#MEMBER`` for a tar member), ``bytes`` and ``mtime``
(the member's size and the shard's mtime for tar members) and, for members, ``member_offset`` (of the member's
header in the tar) and ``caption`` (from the ``.txt``/``.json`` sidecar, kept as the manifest's caption).
``shards.read_bytes(item)`` reads it: webdataset's tar iterator parses the member at its offset, so a Ray task reads
one image without scanning the shard. Listing a shard's members and offsets is a header-only pass with the
standard ``tarfile`` module (it seeks over the image data; webdataset 1.x has no tar index and its iterator
reads every byte).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from ..errors import HeadsUpError, MissingDependencyError
from .dataset import IMAGE_EXTS, list_images

LIST_EXTS = {".parquet", ".csv"}


def _is_tar(p: Path) -> bool:
    return p.suffix == ".tar"


def tar_items(shard: Path) -> list[dict]:
    """The image members of one WebDataset shard (headers only are read, plus the small sidecars)."""
    mtime = shard.stat().st_mtime
    images, side = {}, {}
    with tarfile.open(shard, "r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            key, _, ext = m.name.rpartition(".")
            if "." + ext.lower() in IMAGE_EXTS:
                images[m.name] = {"path": f"{shard}#{m.name}", "bytes": m.size, "mtime": mtime,
                                  "member_offset": m.offset}
            elif ext in ("txt", "json"):
                data = tf.extractfile(m).read()
                try:
                    cap = data.decode() if ext == "txt" else json.loads(data).get("caption")
                except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                    cap = None
                if cap:
                    side.setdefault(key, str(cap).strip())
    for name, it in images.items():
        if name.rpartition(".")[0] in side:
            it["caption"] = side[name.rpartition(".")[0]]
    return [images[k] for k in sorted(images)]


def list_file_paths(path: Path) -> list[Path]:
    """Local image paths from a parquet or CSV list (relative paths are relative to the list's folder)."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise MissingDependencyError('Parquet lists need pyarrow; run `pip install "comfyui-headsup[scale]"`.') \
                from e
        table = pq.read_table(path)
        cols = table.column_names
        rows = None
        for c in ("path", "filepath", "file"):
            if c in cols:
                rows = table.column(c).to_pylist()
                break
        if rows is None:
            rows = table.column(0).to_pylist()
    else:
        import csv

        with path.open(newline="") as fh:
            table = list(csv.reader(fh))
        if not table:
            return []
        head = [h.strip().lower() for h in table[0]]
        col = next((head.index(c) for c in ("path", "filepath", "file") if c in head), None)
        rows = [r[col or 0] for r in (table[1:] if col is not None else table) if r]
    return [p if p.is_absolute() else (path.parent / p) for p in (Path(str(r)) for r in rows if r)]


def list_items(sources) -> list[dict]:
    """Every input image as an item, sorted by ``path`` (the local engine's order)."""
    files, items = [], []
    for s in map(Path, sources):
        if s.is_file() and _is_tar(s):
            items += tar_items(s.resolve())
        elif s.is_file() and s.suffix.lower() in LIST_EXTS:
            files += [p for p in list_file_paths(s)]
        elif s.is_dir():
            items += [it for t in sorted(s.rglob("*.tar")) for it in tar_items(t.resolve())]
            files.append(s)
        elif s.is_file():
            files.append(s)
        else:
            raise HeadsUpError(f"Source {s} does not exist; pass image files, folders, .tar shards or "
                               ".parquet/.csv path lists.")
    missing = [p for p in files if not p.exists()]
    if missing:
        raise HeadsUpError(f"{len(missing)} listed path(s) do not exist, e.g. {missing[0]}.")
    for p in list_images(files) if files else []:
        st = p.stat()
        items.append({"path": str(p), "bytes": st.st_size, "mtime": st.st_mtime})
    uniq = {it["path"]: it for it in items}
    return [uniq[k] for k in sorted(uniq)]
