"""``headsup eval``: run methods over a test set, measure, and write CSV / JSON / markdown reports.

Inputs (one of):
- a folder of GT images: LQ is synthesised with the training degradation (Real-ESRGAN second order, seeded per
  image) — or a bicubic downscale when that module is unavailable, which the report says;
- a PortraitSR-4K-style manifest (JSONL from the dataset builder): same, and reference photos pair up;
- a folder of real LQ images: no GT, so only no-reference metrics.
"""
from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..batch import IMAGE_SUFFIXES
from ..errors import InputImageError, MissingModelError
from .metrics import (
    FACE_METRICS,
    FR_METRICS,
    LOWER_IS_BETTER,
    NR_METRICS,
    MetricSuite,
    face_metrics,
)
from .peak import PeakMeter

METHODS = ("bicubic", "osediff", "blend", "headsup")
IMAGE_EXTS = IMAGE_SUFFIXES  # the one image-suffix list (batch.py)


@dataclass
class Sample:
    name: str
    lq: np.ndarray  # HxWx3 uint8
    gt: np.ndarray | None = None  # HxWx3 uint8, exactly scale x the LQ
    references: list[str] = field(default_factory=list)


def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputImageError(f"Image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise InputImageError(f"No images ({', '.join(IMAGE_EXTS)}) in {folder}.")
    return files


def _u8(path) -> np.ndarray:
    from ..imageio import to_uint8_rgb
    from ..files.read import load_image

    return to_uint8_rgb(load_image(path))


def _fit(gt: np.ndarray, scale: int, max_side: int | None) -> np.ndarray:
    """Optionally shrink the GT (for quick runs), then crop it to a multiple of the scale."""
    if max_side and max(gt.shape[:2]) > max_side:
        from PIL import Image

        k = max_side / max(gt.shape[:2])
        size = (max(scale, round(gt.shape[1] * k)), max(scale, round(gt.shape[0] * k)))
        gt = np.asarray(Image.fromarray(gt).resize(size, Image.Resampling.LANCZOS))
    h, w = (gt.shape[0] // scale) * scale, (gt.shape[1] // scale) * scale
    if h == 0 or w == 0:
        raise InputImageError(f"A GT image of {gt.shape[1]}x{gt.shape[0]} is smaller than the scale {scale}.")
    return np.ascontiguousarray(gt[:h, :w])


def make_degrader(scale: int) -> tuple[Callable[[np.ndarray, int], np.ndarray], str]:
    """``(degrade(gt_u8, seed) -> lq_u8, description)``; falls back to bicubic if the training module is missing."""
    try:
        from ..degradations import RealESRGANDegradation, load_degradation_config

        deg = RealESRGANDegradation(load_degradation_config(None, scale=scale))

        def degrade(gt: np.ndarray, seed: int) -> np.ndarray:
            x = torch.from_numpy(np.array(gt)).permute(2, 0, 1)[None].float() / 255.0  # a writable copy
            lq = deg(x, seed=seed)
            return (lq[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()

        return degrade, f"Real-ESRGAN second-order degradation (headsup_core.degradations), x{scale}"
    except Exception as err:  # ImportError, or a config error: say so and keep going
        from PIL import Image

        def degrade(gt: np.ndarray, seed: int) -> np.ndarray:
            size = (gt.shape[1] // scale, gt.shape[0] // scale)
            return np.asarray(Image.fromarray(gt).resize(size, Image.Resampling.BICUBIC))

        return degrade, f"bicubic downscale x{scale} (training degradation unavailable: {err})"


def read_manifest(path: str | os.PathLike, split: str | None = "test") -> list[dict]:
    """Records ``{"gt": Path, "references": [Path...]}`` from a JSONL (or JSON list) manifest.

    Accepted keys: the image under ``gt``/``path``/``image``/``file``; references under ``references``/
    ``reference``/``refs``/``ref``; records with a ``split`` other than ``split`` or marked rejected are skipped.
    Relative paths are relative to the manifest's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise InputImageError(f"Manifest not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise InputImageError(f"Manifest {path} is not valid JSON/JSONL ({err}).") from None
    out = []
    for rec in records:
        if rec.get("rejected") or rec.get("reject_reason") or rec.get("status") in ("rejected", "duplicate"):
            continue
        if split and rec.get("split") not in (None, split):
            continue
        img = next((rec[k] for k in ("gt", "path", "image", "file") if rec.get(k)), None)
        if img is None:
            continue
        refs = next((rec[k] for k in ("references", "reference", "refs", "ref") if rec.get(k)), [])
        refs = [refs] if isinstance(refs, str) else list(refs)
        refs = [r.get("path") if isinstance(r, dict) else r for r in refs]
        base = path.parent
        out.append({"gt": base / img, "references": [base / r for r in refs if r]})
    if not out:
        raise InputImageError(f"Manifest {path} lists no usable images for split {split!r}.")
    return out


def load_samples(*, gt_dir=None, manifest=None, lq_dir=None, scale: int = 4, seed: int = 0,
                 max_side: int | None = None, limit: int | None = None, split: str | None = "test"):
    """Build the samples and return ``(samples, notes)``; exactly one of the three sources must be given."""
    if sum(x is not None for x in (gt_dir, manifest, lq_dir)) != 1:
        raise InputImageError("Give exactly one of --gt DIR, --manifest FILE or --lq DIR.")
    notes: dict[str, str] = {}
    if lq_dir is not None:
        files = list_images(lq_dir)[:limit]
        notes["inputs"] = f"real LQ images from {lq_dir}: no GT, so only no-reference metrics"
        return [Sample(p.stem, _u8(p)) for p in files], notes
    if manifest is not None:
        records = read_manifest(manifest, split)[:limit]
    else:
        records = [{"gt": p, "references": []} for p in list_images(gt_dir)[:limit]]
    degrade, how = make_degrader(int(scale))
    notes["lq"] = f"{how}; seed per image = {seed} + crc32(name)"
    samples = []
    for rec in records:
        gt = _fit(_u8(rec["gt"]), int(scale), max_side)
        name = Path(rec["gt"]).stem
        lq = degrade(gt, seed + zlib.crc32(name.encode()) % 100000)
        samples.append(Sample(name, lq, gt, [str(r) for r in rec["references"]]))
    return samples, notes


def _to_tensor(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(u8)).permute(2, 0, 1)[None].float() / 255.0


def bicubic(lq: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(lq).resize((out_hw[1], out_hw[0]), Image.Resampling.BICUBIC))


def paste_region_mask(faces, lq_shape, out_hw, crop_size: int = 512, margin: float = 16.0) -> np.ndarray | None:
    """Where the blend baseline's paste boundary lies (hard mask), so every method's seam is measured there."""
    if not faces:
        return None
    from ..blend import _feather_mask, face_crop_transform, paste_face

    acc = np.zeros(out_hw, np.float32)
    base = np.zeros((*out_hw, 3), np.uint8)
    hard = _feather_mask(crop_size, margin, 0.0)
    for f in faces:
        m_out, _ = face_crop_transform(f.kps, out_hw[1] / lq_shape[1], crop_size)
        paste_face(base, np.zeros((crop_size, crop_size, 3), np.uint8), m_out, hard, acc)
    return acc


def run_eval(samples: list[Sample], methods: dict[str, Callable], *, scale: float, suite: MetricSuite | None,
             analyzer=None, out_dir: str | os.PathLike | None = None, device=None,
             log: Callable[[str], None] = print, identity=None) -> dict:
    """Run every method on every sample and measure. ``methods[name](sample, faces_lq) -> (sr_u8, info)``.
    ``identity``: the network for ID similarity (``faces.identity_net.IdentityEmbedder``); None: the analyzer's
    own recognizer. The notes name the network that ran."""
    from .seam import seam_score

    rows: list[dict] = []
    notes: dict[str, str] = {}
    images: dict[str, dict[str, np.ndarray]] = {}
    out_dir = Path(out_dir) if out_dir else None
    for s in samples:
        out_hw = s.gt.shape[:2] if s.gt is not None else (round(s.lq.shape[0] * scale), round(s.lq.shape[1] * scale))
        faces_lq = analyzer.detect(s.lq) if analyzer is not None else None
        faces_gt = analyzer.detect(s.gt) if analyzer is not None and s.gt is not None else None
        ring_mask = paste_region_mask(faces_lq, s.lq.shape, out_hw) if faces_lq else None
        images[s.name] = {"LQ": s.lq}
        for name, fn in methods.items():
            with PeakMeter(device) as peak:
                sr, _info = fn(s, faces_lq)
            sr = np.asarray(sr)
            if sr.shape[:2] != tuple(out_hw):
                raise InputImageError(f"Method {name} returned {sr.shape[1]}x{sr.shape[0]} for {s.name}, "
                                      f"expected {out_hw[1]}x{out_hw[0]}.")
            row: dict[str, Any] = {"image": s.name, "method": name, "seconds": peak.seconds,
                                   "peak_mem_mb": peak.mb}
            notes.setdefault("peak_mem", peak.kind)
            row.update((_info or {}).get("row", {}))
            if suite is not None:
                if s.gt is not None:
                    row.update(suite.full_reference(_to_tensor(sr), _to_tensor(s.gt)))
                row.update(suite.no_reference(_to_tensor(sr)))
            if analyzer is not None and s.gt is not None:
                means, _ = face_metrics(sr, s.gt, analyzer, suite, gt_faces=faces_gt, identity=identity)
                row.update({k: means[k] for k in FACE_METRICS})
                row["faces"] = means["faces"]
            if ring_mask is not None and s.gt is not None:
                row["seam"] = seam_score(sr, s.gt, ring_mask)["seam"]
            rows.append(row)
            images[s.name][name] = sr
            if out_dir is not None:
                from PIL import Image

                (out_dir / "images" / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(sr).save(out_dir / "images" / name / f"{s.name}.png")
            log(f"{s.name} {name}: {peak.seconds:.2f}s " + " ".join(
                f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float) and k not in ("seconds", "peak_mem_mb")))
        if s.gt is not None:
            images[s.name]["GT"] = s.gt
            if out_dir is not None:
                from PIL import Image

                (out_dir / "images" / "GT").mkdir(parents=True, exist_ok=True)
                Image.fromarray(s.gt).save(out_dir / "images" / "GT" / f"{s.name}.png")
    fid = {}
    if suite is not None and "fid" in suite.names and out_dir is not None and samples and samples[0].gt is not None:
        for name in methods:
            fid[name] = suite.fid(out_dir / "images" / name, out_dir / "images" / "GT")
        notes["fid"] = f"FID over {len(samples)} images; it is unreliable below a few hundred images"
    if analyzer is not None:
        notes["id_sim"] = "ID similarity (common scale) with " + (
            identity.name if identity is not None else
            f"the {getattr(analyzer, 'backend', '?')} face analyzer's recognizer "
            f"({getattr(analyzer, 'identity_kind', 'arcface')})")
    if suite is not None:
        notes.update({f"metric:{k}": v for k, v in suite.notes.items()})
        notes["psnr_ssim"] = f"PSNR/SSIM on Y (BT.601 YCbCr), crop border {suite.crop_border} px; identical = 80 dB"
    return {"rows": rows, "means": means_by_method(rows, list(methods), fid), "notes": notes, "images": images}


def means_by_method(rows: list[dict], methods: list[str], fid: dict | None = None) -> dict[str, dict]:
    out = {}
    for m in methods:
        sel = [r for r in rows if r["method"] == m]
        keys = [k for k in sel[0] if k not in ("image", "method")] if sel else []
        out[m] = {}
        for k in keys:
            vals = [r[k] for r in sel if isinstance(r.get(k), (int, float)) and r.get(k) is not None
                    and math.isfinite(r[k])]
            out[m][k] = float(np.mean(vals)) if vals else None
        if fid and fid.get(m) is not None:
            out[m]["fid"] = fid[m]
    return out


def _cell(v) -> str:
    return "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def write_reports(result: dict, out_dir: str | os.PathLike, config: dict | None = None) -> dict[str, Path]:
    """results.csv (per-image rows, then one MEAN row per method), results.json and results.md."""
    import csv

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, means = result["rows"], result["means"]
    cols = ["image", "method"]
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols + (["fid"] if any("fid" in m for m in means.values()) else []))
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(v) for k, v in r.items()})
        for m, vals in means.items():
            w.writerow({"image": "MEAN", "method": m, **{k: _cell(v) for k, v in vals.items()}})
    payload = {"config": config or {}, "notes": result["notes"], "rows": rows, "means": means}
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    order = [c for c in (*FR_METRICS, "fid", *NR_METRICS, *FACE_METRICS, "seam", "seconds", "peak_mem_mb")
             if any(means[m].get(c) is not None for m in means)]
    lines = ["| method | " + " | ".join(f"{c} {'↓' if c in LOWER_IS_BETTER else '↑'}"
                                        if c not in ("seconds", "peak_mem_mb") else c for c in order) + " |",
             "|---" * (len(order) + 1) + "|"]
    for m, vals in means.items():
        lines.append(f"| {m} | " + " | ".join(_cell(vals.get(c)) for c in order) + " |")
    lines += ["", f"{len({r['image'] for r in rows})} images. Notes:"]
    lines += [f"- {k}: {v}" for k, v in result["notes"].items()]
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"csv": out / "results.csv", "json": out / "results.json", "md": out / "results.md"}


def build_methods(names, *, base=None, weights=None, osediff_weights=None, face_weights=None, device=None,
                  dtype=None, scale: float = 4.0, tile_size=None, color_fix: str = "adain", seed: int = 0,
                  analyzer=None, feather: float = 24.0) -> dict[str, Callable]:
    """Method callables for :func:`run_eval`; one pipeline per distinct weights file, loaded once."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise InputImageError(f"Unknown method(s) {unknown}; choose from {', '.join(METHODS)}.")
    pipes: dict[str, Any] = {}

    def pipe(w):
        if base is None:
            raise MissingModelError("This method needs a base model: pass --base (a diffusers folder or SD2 file).")
        if w is not None and not Path(w).exists():
            raise MissingModelError(f"Weights file not found: {w}")
        key = str(w)
        if key not in pipes:
            from ..pipeline import HeadsUpPipeline

            pipes[key] = HeadsUpPipeline.from_files(base, weights=w, device=device, dtype=dtype)
        return pipes[key]

    from ..runner import upscale_with_retry  # the one OOM policy: halve the tiles and retry

    common = dict(tile_size=tile_size, color_fix=color_fix, seed=seed)
    methods: dict[str, Callable] = {}
    for n in names:
        if n == "bicubic":
            def run_bicubic(s, faces):
                hw = s.gt.shape[:2] if s.gt is not None else (round(s.lq.shape[0] * scale),
                                                              round(s.lq.shape[1] * scale))
                return bicubic(s.lq, hw), {}
            methods[n] = run_bicubic
        elif n == "osediff":
            p = pipe(osediff_weights)
            methods[n] = lambda s, faces, p=p: (upscale_with_retry(p, s.lq, scale=scale, **common), {})
        elif n == "headsup":
            if weights is None:
                raise MissingModelError("--method headsup needs --weights (a HeadsUp .safetensors).")
            p = pipe(weights)

            def run(s, faces, p=p):
                refs = None
                if s.references and analyzer is not None:
                    from ..files.read import load_image

                    refs = [load_image(r) for r in s.references]
                out, info = upscale_with_retry(p, s.lq, scale=scale, reference=refs, face_analyzer=analyzer,
                                               return_info=True, **common)
                used = sum(a.get("reference_index") is not None for faces in info.get("assignments") or []
                           for a in faces or [])
                return out, {"row": {"refs_used": used}} if refs else {}
            methods[n] = run
        elif n == "blend":
            from ..blend import blend_upscale

            g, f = pipe(osediff_weights), pipe(face_weights or osediff_weights)
            methods[n] = lambda s, faces, g=g, f=f: blend_upscale(
                s.lq, g, f, scale, analyzer, faces=faces or [], feather=feather, return_info=True, **common)
    return methods
