"""``headsup eval-arms``: evaluate saved training arms on the people of any folder with an ``identities.csv``.

An *arm* is a folder holding ``weights.safetensors`` (a HeadsUp checkpoint from ``Trainer.save_checkpoint``) and
``arm.json`` (its name, seed, steps and the base it was trained on). The toy study (``bench/train_toy.py``) saves
one per arm and seed; anyone can then measure them on people of their own.

The folder's photos are paired as PortraitSR-4K pairs are: a reference is *another photo of the same person*
(``identities.csv``: ``file,identity``). Each photo's largest dlib face is kept; photos are shrunk so that face
is at most ``FACE_PX`` wide. Fixed GT crops centred on that face (the training data code, ``PortraitCrops``)
are degraded with fixed seeds (Real-ESRGAN, x4) and restored with the person's other photo as reference, and
without. Measures per crop: face-region PSNR and SSIM (inside the GT face box), background PSNR (outside the
face mask), whole-crop PSNR, and identity cosine SR-vs-GT with dlib's C++ ``compute_face_descriptor`` and with
its torch port (``faces.load_identity_network("dlib")``), both on the same dlib landmarks of the GT face.
"""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import HeadsUpError, MissingDependencyError
from .metrics import psnr as metrics_psnr

FACE_PX = 100        # largest face width kept in the prepared photos (references keep this much detail)
DETECT_SIDE = 1200   # photos are shrunk to this long side before detection (speed; faces here are large)
MEASURES = ("face_psnr", "face_ssim", "bg_psnr", "psnr", "id_dlib", "id_torch")


def read_identities(folder) -> dict[str, str]:
    """``identities.csv`` (``file,identity``) of ``folder``: file name -> identity."""
    path = Path(folder) / "identities.csv"
    if not path.is_file():
        raise HeadsUpError(f"{folder} has no identities.csv (one row per photo: file,identity).")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"file", "identity"} <= set(rows[0]):
        raise HeadsUpError(f"{path} must have the columns file,identity.")
    return {r["file"].strip(): r["identity"].strip() for r in rows if r["file"].strip()}


def prepare_pairs(folder, work, test_ids=None, analyzer=None, gt_size: int = 96, log=print) -> Path:
    """Shrunken photos, ``manifest.jsonl`` (split ``test`` for ``test_ids``, all when None; else ``train``) and
    ``pairs.jsonl`` (each photo's face with every other photo of the same person) in ``work``; cached."""
    import cv2
    from PIL import Image, ImageOps

    work = Path(work)
    man = work / "manifest.jsonl"
    if man.is_file():
        return man
    ids = read_identities(folder)
    if analyzer is None:
        from ..faces import load_face_analyzer

        analyzer = load_face_analyzer("dlib")
    (work / "img").mkdir(parents=True, exist_ok=True)
    recs, skipped = [], []
    for name, who in sorted(ids.items()):
        src = Path(folder) / name
        if not src.is_file():
            skipped.append(f"{name} (missing)")
            continue
        with Image.open(src) as im:
            rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        s = min(1.0, DETECT_SIDE / max(rgb.shape[:2]))
        if s < 1:
            rgb = cv2.resize(rgb, (round(rgb.shape[1] * s), round(rgb.shape[0] * s)), interpolation=cv2.INTER_AREA)
        faces = [f for f in analyzer.detect(rgb) if np.linalg.norm(f.kps[1] - f.kps[0]) >= 16 and f.det_score > 0.5]
        if not faces:
            skipped.append(f"{name} (no face)")
            continue
        f = max(faces, key=lambda f: f.area)
        z = min(1.0, FACE_PX / float(f.bbox[2] - f.bbox[0]))
        z = max(z, gt_size / min(rgb.shape[:2]))
        if z != 1.0:
            rgb = cv2.resize(rgb, (math.ceil(rgb.shape[1] * z), math.ceil(rgb.shape[0] * z)),
                             interpolation=cv2.INTER_AREA if z < 1 else cv2.INTER_CUBIC)
        path = work / "img" / (Path(name).stem + ".png")
        Image.fromarray(rgb).save(path)
        test = test_ids is None or who in {str(t) for t in test_ids}
        recs.append({"path": str(path), "status": "kept", "split": "test" if test else "train", "identity": who,
                     "source": name, "width": rgb.shape[1], "height": rgb.shape[0],
                     "faces": [{"bbox": [float(v) * z for v in f.bbox], "kps": (np.asarray(f.kps) * z).tolist()}]})
    pairs = [{"portrait": a["path"], "face": 0, "reference": b["path"], "reference_face": 0}
             for a in recs for b in recs if a is not b and a["identity"] == b["identity"]]
    (work / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    man.write_text("".join(json.dumps(r) + "\n" for r in recs))
    if skipped:
        log(f"skipped {len(skipped)} photos: {', '.join(skipped)}")
    return man


def eval_items(manifest, gt_size: int, with_ref: bool, per_photo: int = 1, self_ref: bool = False) -> list[dict]:
    """Fixed crops of the ``test`` photos that have a reference (same crops, references and seeds every call).
    ``self_ref``: the reference is the GT face itself under a warp (``train.data.self_reference``), a diagnostic
    of how much a perfectly matching photo of the person could give."""
    from dataclasses import replace

    from ..train.data import PortraitCrops, load_samples

    samples = [s for s in load_samples(manifest, (), "test") if s.refs]
    if not samples:
        raise HeadsUpError("No held-out photo has another photo of the same person to serve as its reference.")
    if self_ref:
        samples = [replace(s, refs={}) for s in samples]
    ds = PortraitCrops(samples, gt_size, 4, 0.0 if with_ref else 1.0, 1.0, 8.0, flip_prob=0.0, self_ref=self_ref)
    items = [ds[(i, 50_000 + 1000 * j + i)] for i in range(len(samples)) for j in range(per_photo)]
    for it, (i, _) in zip(items, [(i, j) for i in range(len(samples)) for j in range(per_photo)]):
        it["photo"] = Path(samples[i].path).name
    return items


def lq_of(gt: torch.Tensor, seed: int, degrade) -> torch.Tensor:
    """Real-ESRGAN x4 LQ with a fixed seed, bicubic back to the GT size (as inference upscales)."""
    lq = degrade(gt, seed=seed)
    return F.interpolate(lq, size=gt.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)


def psnr(a, b, m=None) -> float:
    """PSNR over the pixels where ``m`` (Bx1xHxW) is 1 (all when None); finite for identical crops."""
    return metrics_psnr(a, b, mask=m, min_mse=1e-10)


class IdentityJudge:
    """Identity cosine of SR vs GT faces with dlib's C++ descriptor and its torch port, on one landmark set."""

    def __init__(self):
        from ..faces.dlib_backend import (
            PREDICTOR_FILE,
            RECOGNIZER_FILE,
            _dlib,
            default_model_dir,
        )
        from ..faces.identity_net import load_identity_network

        self.dlib = _dlib()
        folder = default_model_dir()
        if folder is None:
            raise HeadsUpError("Identity cosine needs face-recognition-models: pip install face-recognition-models.")
        self.sp = self.dlib.shape_predictor(str(folder / PREDICTOR_FILE))
        self.rec = self.dlib.face_recognition_model_v1(str(folder / RECOGNIZER_FILE))
        self.net = load_identity_network("dlib")

    def __call__(self, sr_u8: np.ndarray, gt_u8: np.ndarray, kps: np.ndarray) -> tuple[float, float]:
        eye = float(np.linalg.norm(kps[1] - kps[0]))
        cx, cy = kps[:2].mean(0) + [0, 0.25 * eye]
        h = 1.2 * eye
        rect = self.dlib.rectangle(round(cx - h), round(cy - h), round(cx + h), round(cy + h))
        shape = self.sp(gt_u8, rect)  # the GT face's landmarks, used for both images
        c = [np.asarray(self.rec.compute_face_descriptor(im, shape)) for im in (sr_u8, gt_u8)]
        chips = [np.asarray(self.dlib.get_face_chip(im, shape, 150, 0.25), np.float32) for im in (sr_u8, gt_u8)]
        with torch.no_grad():
            t = F.normalize(self.net(torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2)), dim=1)
        cos_c = float(np.dot(c[0], c[1]) / (np.linalg.norm(c[0]) * np.linalg.norm(c[1])))
        return cos_c, float((t[0] * t[1]).sum())


def item_kps(item) -> list[np.ndarray]:
    """Face landmarks of a crop, recovered from its stored 5-point ArcFace alignment matrices."""
    from ..train.losses import ARCFACE_TEMPLATE

    arc = ARCFACE_TEMPLATE.astype(np.float64)
    out = []
    for m in item["align"].numpy().astype(np.float64):
        inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
        out.append(arc @ inv[:, :2].T + inv[:, 2])
    return out


@torch.no_grad()
def evaluate(gen, prompt_embeds, items, degrade, judge: IdentityJudge | None = None, rows: list | None = None):
    """Mean of each measure over ``items`` (``MEASURES``; identity ones only with a ``judge``)."""
    try:
        from skimage.metrics import structural_similarity
    except ImportError as e:
        raise MissingDependencyError("Face SSIM needs scikit-image: pip install 'comfyui-headsup[faces]'.") from e

    from ..train.data import collate

    was = gen.training
    gen.eval()
    res = {k: [] for k in MEASURES + ("bicubic_face_psnr",)}
    u8 = lambda t: np.ascontiguousarray((t[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    for i, it in enumerate(items):
        b = collate([it])
        gt = b["gt"]
        lq = lq_of(gt, 7919 * i + 99991, degrade)
        _, sr = gen(lq * 2 - 1, b["canvas"], b["mask"], b["has_ref"], prompt_embeds, b["ref_windows"])
        sr = ((sr.float() + 1) / 2).clamp(0, 1)
        row = {"photo": it.get("photo", str(i)), "reference": bool(b["has_ref"][0]), "psnr": psnr(sr, gt),
               "bg_psnr": psnr(sr, gt, (b["mask"] == 0).float())}
        boxes = b["faces"]["boxes"]
        if len(boxes):
            _, x0, y0, x1, y1 = [round(v) for v in boxes[0].tolist()]
            m = torch.zeros_like(gt[:, :1])
            m[..., y0:y1, x0:x1] = 1
            row["face_psnr"], row["bicubic_face_psnr"] = psnr(sr, gt, m), psnr(lq, gt, m)
            row["face_ssim"] = float(structural_similarity(u8(sr)[y0:y1, x0:x1], u8(gt)[y0:y1, x0:x1],
                                                           channel_axis=2, data_range=255))
            if judge is not None:
                row["id_dlib"], row["id_torch"] = judge(u8(sr), u8(gt), item_kps(it)[0])
        for k, v in row.items():
            if k in res:
                res[k].append(v)
        if rows is not None:
            rows.append(row)
    gen.train(was)
    return {k: float(np.mean(v)) for k, v in res.items() if v}


def load_arm(arm_dir, base=None, device="cpu"):
    """(generator, prompt embeddings, arm.json) of a saved arm; ``base`` overrides the one arm.json names."""
    from ..loading.build import build_model
    from ..train.generator import HeadsUpGenerator

    arm_dir = Path(arm_dir)
    meta_file, weights = arm_dir / "arm.json", arm_dir / "weights.safetensors"
    if not meta_file.is_file() or not weights.is_file():
        raise HeadsUpError(f"{arm_dir} is not a saved arm (it needs arm.json and weights.safetensors).")
    meta = json.loads(meta_file.read_text())
    base = Path(base) if base else (arm_dir / meta["base"]).resolve()
    if not base.exists():
        raise HeadsUpError(f"The base of arm {arm_dir} ({base}) does not exist; pass --base.")
    model, _ = build_model(str(base), str(weights), device=device, dtype=torch.float32, weight_dtype="fp32")
    return HeadsUpGenerator(model).eval(), model.default_prompt_embeds, meta


def eval_arms(arm_dirs, folder, work, *, base=None, per_photo: int = 1, gt_size: int = 96, log=print) -> dict:
    """Every arm on every photo of ``folder`` that has another photo of the same person: with the reference
    and without. Returns {"rows": per-crop rows, "means": per arm and mode}."""
    from ..degradations import RealESRGANDegradation

    manifest = prepare_pairs(folder, work, None, gt_size=gt_size, log=log)
    items = {mode: eval_items(manifest, gt_size, mode == "reference", per_photo) for mode in ("reference", "none")}
    judge, degrade = IdentityJudge(), RealESRGANDegradation()
    rows, means = [], []
    for d in arm_dirs:
        gen, embeds, meta = load_arm(d, base)
        for mode, its in items.items():
            arm_rows: list = []
            m = evaluate(gen, embeds, its, degrade, judge, arm_rows)
            tag = {"arm": meta.get("arm", Path(d).name), "seed": meta.get("seed"), "dir": str(d), "mode": mode}
            rows += [{**tag, **r} for r in arm_rows]
            means.append({**tag, "crops": len(its), **m})
            log(f"{tag['arm']} seed {tag['seed']} ({mode}): " + ", ".join(f"{k} {m[k]:.3f}" for k in MEASURES
                                                                          if k in m))
    return {"rows": rows, "means": means}


def means_table(means: list[dict]) -> str:
    """Markdown: per arm and mode, mean ± std over seeds of each measure."""
    import statistics

    lines = ["| arm | mode | seeds | " + " | ".join(MEASURES) + " |", "|---" * (len(MEASURES) + 3) + "|"]
    groups: dict = {}
    for m in means:
        groups.setdefault((m["arm"], m["mode"]), []).append(m)
    for (arm, mode), ms in groups.items():
        cells = []
        for k in MEASURES:
            v = [m[k] for m in ms if k in m]
            cells.append(f"{statistics.mean(v):.3f} ± {statistics.pstdev(v):.3f}" if v else "-")
        lines.append(f"| {arm} | {mode} | {len(ms)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def find_arms(paths) -> list[Path]:
    """Saved-arm folders among ``paths``; a folder of saved arms (e.g. the study's ``arms/``) gives all of them."""
    out = []
    for p in map(Path, paths):
        if (p / "arm.json").is_file():
            out.append(p)
        elif p.is_dir() and any(p.glob("*/arm.json")):
            out += sorted(q.parent for q in p.glob("*/arm.json"))
        else:
            raise HeadsUpError(f"{p} is neither a saved arm (arm.json + weights.safetensors) nor a folder of them.")
    return out


def run_eval_arms_command(args) -> int:
    import csv as csv_mod

    arms = find_arms(args.arms)
    out = Path(args.out)
    result = eval_arms(arms, args.data, out / "data", base=args.base, per_photo=args.per_photo,
                       gt_size=args.gt_size, log=lambda *a: print(*a, file=sys.stderr) if not args.quiet else None)
    cols = ["arm", "seed", "mode", "photo", "reference", *MEASURES, "bicubic_face_psnr"]
    with (out / "arms_eval.csv").open("w", newline="") as fh:
        w = csv_mod.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(result["rows"])
    (out / "arms_eval.json").write_text(json.dumps({"data": str(args.data), "means": result["means"]}, indent=1))
    table = means_table(result["means"])
    (out / "arms_eval.md").write_text(table + "\n")
    print(table)
    print(f"Wrote {out / 'arms_eval.csv'}, {out / 'arms_eval.json'} and {out / 'arms_eval.md'}")
    return 0
