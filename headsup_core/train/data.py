"""Training data: GT crops with their face boxes, and the reference canvas + face mask built by the *inference*
code (``headsup_core.faces.build_face_condition`` with the known GT faces), so training and inference condition
the UNet identically.

Batches are a pure function of (seed, step): ``StepBatches`` walks seeded per-epoch permutations and gives every
sample its own seed (crop, reference choice, reference dropout). Resuming at step N therefore sees exactly the
batches an uninterrupted run would, with no data-loader state to save. The LQ image is synthesised later, on
the training device (``headsup_core/degradations.py``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import HeadsUpError


@dataclass
class Sample:
    path: str
    faces: list[dict] = field(default_factory=list)             # bbox (xyxy), kps (5x2) in image pixels
    refs: dict[int, list[tuple[str, list]]] = field(default_factory=dict)  # face index -> [(ref path, ref kps)]
    tags: str = ""                                              # per-image tags/caption from the manifest


def manifest_tags(rec: dict) -> str:
    """A manifest record's tags (``tags``: a list or a string, else ``caption``) as one comma-separated string."""
    t = rec.get("tags", rec.get("caption", ""))
    if isinstance(t, (list, tuple)):
        t = ", ".join(str(x).strip() for x in t if str(x).strip())
    return str(t or "").strip()


def format_prompt(tags: str = "", prompt: str = "") -> str:
    """OSEDiff's prompt string ``f"{tags}, {prompt},"``: ``", ,"`` with neither."""
    return f"{tags or ''}, {prompt or ''},"


def load_shard_samples(shards, split: str = "train") -> tuple[list[Sample], list[str]]:
    """Kept images of ``split`` from the builder's WebDataset shards (``shards.py``), in key order, and the shard
    of each (for shard-local reading order). Images are read from the tars (``wds:TAR#OFFSET`` paths)."""
    from .shards import index_shards, shard_member_path

    index = index_shards(shards)
    if not index:
        raise HeadsUpError(f"No WebDataset shards with images and JSON found in {shards}; build them with "
                           "`headsup dataset build --engine ray` (or --shard-size N).")
    out, groups = [], []
    for key in sorted(index):
        e, j = index[key], index[key]["json"]
        if j.get("split", "train") != split:
            continue
        refs = {int(k): [("wds:" + shard_member_path(index[rk]), kps) for rk, _, kps in v if rk in index]
                for k, v in j.get("references", {}).items()}
        out.append(Sample("wds:" + shard_member_path(e), j.get("faces", []), {k: v for k, v in refs.items() if v},
                          manifest_tags(j)))
        groups.append(e["tar"])
    return out, groups


def load_samples(manifest=None, folders=(), split: str = "train") -> list[Sample]:
    """Kept images of ``split`` from a builder manifest (with their reference pairs), plus plain folders."""
    from .dataset import list_images

    out: list[Sample] = []
    if manifest:
        manifest = Path(manifest)
        if not manifest.is_file():
            raise HeadsUpError(f"Manifest {manifest} does not exist; build one with `headsup dataset build`.")
        recs = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
        by_path = {r["path"]: r for r in recs}
        pairs_file = manifest.parent / "pairs.jsonl"
        pairs = [json.loads(line) for line in pairs_file.read_text().splitlines()] if pairs_file.is_file() else []
        refs: dict[tuple[str, int], list] = {}
        for p in pairs:
            ref = by_path.get(p["reference"])
            if ref is not None:
                refs.setdefault((p["portrait"], p["face"]), []).append(
                    (p["reference"], ref["faces"][p["reference_face"]]["kps"]))
        for r in recs:
            if r.get("status") == "kept" and r.get("split", "train") == split:
                out.append(Sample(r["path"], r.get("faces", []),
                                  {k: refs[(r["path"], k)] for k in range(len(r.get("faces", [])))
                                   if (r["path"], k) in refs}, manifest_tags(r)))
    if folders:
        out += [Sample(str(p)) for p in list_images(folders)]
    return out


def _read_rgb(path: str) -> np.ndarray:
    """An image file, or a member of a WebDataset shard (``wds:TAR#OFFSET``)."""
    import io

    from PIL import Image, ImageOps

    if path.startswith("wds:"):
        from .shards import read_member

        path = io.BytesIO(read_member(path[4:]))
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


_MIRROR_KPS = [1, 0, 2, 4, 3]  # left/right eye and mouth corners swap under a horizontal flip


def _mirror_face(f: dict, w: int) -> dict:
    kps = np.asarray(f["kps"], np.float32).copy()
    kps[:, 0] = (w - 1) - kps[:, 0]
    x0, y0, x1, y1 = f["bbox"]
    return {**f, "kps": kps[_MIRROR_KPS].tolist(), "bbox": [w - x1, y0, w - x0, y1]}


def self_reference(rgb: np.ndarray, kps: np.ndarray, rng, size: int = 128, warp: float = 0.08,
                   kps_noise: float = 0.04, jitter: float = 0.15):
    """A reference made from the GT face itself (toy studies, no reference pairs): the aligned face under a random
    similarity warp (rotation, scale and shift of up to ``warp``), landmark noise of ``kps_noise`` x the eye
    distance (so the conditioning must tolerate misalignment, as with a detector on another photo) and a
    per-channel gain/offset colour jitter of up to ``jitter``. Returns (crop uint8 size², kps in the crop)."""
    import cv2

    from ..faces.align import align_face, estimate_similarity

    crop, ckps, _ = align_face(rgb, kps, size)
    ang = rng.uniform(-warp, warp) * 180.0 / np.pi
    centre = (size / 2 + rng.uniform(-warp, warp) * size, size / 2 + rng.uniform(-warp, warp) * size)
    m = cv2.getRotationMatrix2D(centre, ang, 1.0 + rng.uniform(-warp, warp))
    crop = cv2.warpAffine(crop, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    ckps = ckps @ m[:, :2].T + m[:, 2]
    eye = float(np.linalg.norm(ckps[1] - ckps[0]))
    ckps = ckps + rng.normal(0.0, kps_noise * eye, ckps.shape)
    estimate_similarity(ckps, ckps)  # raises on degenerate landmarks
    gain = 1.0 + rng.uniform(-jitter, jitter, 3)
    offset = rng.uniform(-jitter, jitter, 3) * 64.0
    crop = np.clip(crop.astype(np.float32) * gain + offset, 0, 255).round().astype(np.uint8)
    return crop, ckps.astype(np.float32)


class PortraitCrops(torch.utils.data.Dataset):
    """Index with ``(sample index, sample seed)``; returns one training example (see ``collate``).

    ``flip_prob``: horizontal flip of the image and its faces (landmarks mirrored and re-ordered).
    ``self_reference``: when a face has no reference pair, make one from the GT face (``self_reference()``).
    """

    def __init__(self, samples: list[Sample], gt_size: int = 512, scale: int = 4, ref_dropout: float = 0.2,
                 face_crop_prob: float = 0.8, min_eye_distance: float = 16.0, flip_prob: float = 0.5,
                 self_ref: bool = False):
        if not samples:
            raise HeadsUpError("The training data is empty; check data.manifest / data.folders in the config.")
        if gt_size % (8 * scale):
            raise HeadsUpError(f"data.gt_size {gt_size} must be a multiple of {8 * scale} (VAE factor x scale).")
        self.samples, self.gt, self.scale = samples, gt_size, scale
        self.ref_dropout, self.face_crop_prob, self.min_eye = ref_dropout, face_crop_prob, min_eye_distance
        self.flip_prob, self.self_ref = flip_prob, self_ref

    def __len__(self):
        return len(self.samples)

    def _crop_box(self, rng, faces: list[dict], h: int, w: int):
        g = self.gt
        faces = [f for f in faces if np.linalg.norm(np.subtract(f["kps"][1], f["kps"][0])) >= self.min_eye]
        if faces and rng.random() < self.face_crop_prob:
            f = faces[rng.integers(len(faces))]
            cx, cy = (f["bbox"][0] + f["bbox"][2]) / 2, (f["bbox"][1] + f["bbox"][3]) / 2
            cx, cy = cx + rng.uniform(-0.15, 0.15) * g, cy + rng.uniform(-0.15, 0.15) * g
            x0, y0 = int(np.clip(round(cx - g / 2), 0, w - g)), int(np.clip(round(cy - g / 2), 0, h - g))
        else:
            x0, y0 = int(rng.integers(0, w - g + 1)), int(rng.integers(0, h - g + 1))
        return x0, y0

    def __getitem__(self, item):
        import cv2

        from ..faces import DetectedFace, Reference, build_face_condition
        from ..faces.align import align_face
        from .losses import face_align_matrix

        index, seed = item
        rng = np.random.default_rng(seed)
        s = self.samples[index]
        rgb = _read_rgb(s.path)
        h, w = rgb.shape[:2]
        # faces larger than ~60% of the crop are shrunk so that whole faces are supervised (guess)
        big = max((f["bbox"][2] - f["bbox"][0] for f in s.faces), default=0)
        zoom = min(1.0, 0.6 * self.gt / big) if big else 1.0
        zoom = max(zoom, self.gt / min(h, w))  # never below the crop size
        if zoom != 1.0:
            rgb = cv2.resize(rgb, (math.ceil(w * zoom), math.ceil(h * zoom)),
                             interpolation=cv2.INTER_AREA if zoom < 1 else cv2.INTER_CUBIC)
            h, w = rgb.shape[:2]
        src_faces = [{**f, "kps": (np.asarray(f["kps"], np.float32) * zoom).tolist(),
                      "bbox": [float(v) * zoom for v in f["bbox"]]} for f in s.faces]
        if rng.random() < self.flip_prob:
            rgb = np.ascontiguousarray(rgb[:, ::-1])
            src_faces = [_mirror_face(f, w) for f in src_faces]
        x0, y0 = self._crop_box(rng, src_faces, h, w)
        g = self.gt
        crop = np.ascontiguousarray(rgb[y0:y0 + g, x0:x0 + g])
        use_refs = rng.random() >= self.ref_dropout
        faces, refs, loss_boxes, loss_align = [], [], [], []
        for k, f in enumerate(src_faces):
            kps = np.asarray(f["kps"], np.float32) - [x0, y0]
            box = np.asarray(f["bbox"], np.float32) - [x0, y0, x0, y0]
            if not ((kps >= 0) & (kps < g)).all():
                continue  # landmarks outside the crop: neither conditioning nor face loss
            emb = np.zeros(max(8, len(src_faces)), np.float32)
            emb[k] = 1.0  # unique per face, so each reference is matched to its own face
            faces.append(DetectedFace(bbox=box, kps=kps, det_score=1.0, embedding=emb)
                         .scaled(1 / self.scale, 1 / self.scale))
            if use_refs and s.refs.get(k):
                ref_path, ref_kps = s.refs[k][rng.integers(len(s.refs[k]))]
                rcrop, rkps, _ = align_face(_read_rgb(ref_path), np.asarray(ref_kps, np.float32))
                refs.append(Reference(crop=rcrop, kps=rkps, embedding=emb))
            elif use_refs and self.self_ref:
                rcrop, rkps = self_reference(rgb, np.asarray(f["kps"], np.float32), rng)
                refs.append(Reference(crop=rcrop, kps=rkps, embedding=emb))
            if np.linalg.norm(kps[1] - kps[0]) >= self.min_eye:
                loss_boxes.append(np.clip(box, 0, g))
                loss_align.append(face_align_matrix(kps))
        lq_shape = (g // self.scale, g // self.scale, 3)
        cond = build_face_condition(np.zeros(lq_shape, np.uint8), (g, g), None, refs or None, match_threshold=0.5,
                                    mask_without_reference=True, faces=faces)
        return {"index": index, "seed": seed, "gt": torch.from_numpy(np.array(crop)).permute(2, 0, 1).float().div(255),
                "canvas": cond.canvas[0], "mask": cond.mask[0], "has_ref": torch.tensor(cond.has_reference),
                "boxes": torch.from_numpy(np.array(loss_boxes, np.float32).reshape(-1, 4)),
                "align": torch.from_numpy(np.array(loss_align, np.float32).reshape(-1, 2, 3)),
                "tags": s.tags,
                "ref_windows": torch.tensor([a["ref_window"] for a in cond.assignments if "ref_window" in a],
                                            dtype=torch.long).reshape(-1, 4)}


def collate(items: list[dict]) -> dict:
    out = {k: torch.stack([it[k] for it in items]) for k in ("gt", "canvas", "mask", "has_ref")}
    idx = torch.cat([torch.full((len(it["boxes"]), 1), float(i)) for i, it in enumerate(items)])
    out["tags"] = [it.get("tags", "") for it in items]
    if all("index" in it for it in items):  # sample indices (logged) and per-sample seeds (the LQ synthesis)
        out["index"] = torch.tensor([int(it["index"]) for it in items], dtype=torch.long)
        out["seeds"] = [int(it["seed"]) for it in items]
    out["ref_windows"] = [it.get("ref_windows", torch.zeros(0, 4, dtype=torch.long)) for it in items]
    out["faces"] = {"boxes": torch.cat([idx, torch.cat([it["boxes"] for it in items])], 1),
                    "align": torch.cat([it["align"] for it in items])}
    return out


class StepBatches(torch.utils.data.Sampler):
    """Batch sampler: global step s -> this process's slice of the s-th global batch, with per-sample seeds.

    Global position p = s x (batch x world) + rank x batch + j walks seeded per-epoch permutations, so over the
    ranks every sample is used once per epoch: none twice, none dropped (an epoch that does not fill the last
    global batch continues into the next one). DataLoader workers take whole batches in turn, so they split the
    work without changing it. ``groups`` (e.g. the shard of each sample): the permutation shuffles the groups,
    then the samples within each, so consecutive positions read one shard at a time (WebDataset-style streaming).
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0, world: int = 1, rank: int = 0,
                 steps: int | None = None, groups: list | None = None):
        self.n, self.bs, self.seed, self.start, self.world, self.rank = n, batch_size, seed, start_step, world, rank
        self.steps = steps
        self.groups = None
        if groups is not None:
            by: dict = {}
            for i, g in enumerate(groups):
                by.setdefault(g, []).append(i)
            self.groups = [np.array(by[g]) for g in sorted(by)]

    def _perm(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        if self.groups is None:
            return rng.permutation(self.n)
        return np.concatenate([rng.permutation(self.groups[g]) for g in rng.permutation(len(self.groups))])

    def batch(self, step: int) -> list[tuple[int, int]]:
        gb = self.bs * self.world
        out, cache = [], {}
        for j in range(self.rank * self.bs, (self.rank + 1) * self.bs):
            pos = step * gb + j
            epoch, k = divmod(pos, self.n)
            if epoch not in cache:
                cache[epoch] = self._perm(epoch)
            seed = int(np.random.default_rng([self.seed, step, j]).integers(2**62))
            out.append((int(cache[epoch][k]), seed))
        return out

    def __iter__(self):
        step = self.start
        while self.steps is None or step < self.start + self.steps:
            yield self.batch(step)
            step += 1

    def __len__(self):
        return self.steps if self.steps is not None else 2**31
