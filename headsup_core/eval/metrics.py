"""Image-quality metrics through pyiqa, strictly offline, plus face metrics computed by us.

Weights location. pyiqa and the torchvision/CLIP/timm backbones it builds on download into torch's hub
directory (and the Hugging Face cache) on first use. Here every metric is created inside
:func:`offline_weights`, which points all of those at one folder (``metrics root``, laid out like a torch hub
directory: ``pyiqa/`` for pyiqa's files, ``checkpoints/`` for torchvision backbones, ``clip/``, ``huggingface/``)
and turns every download attempt into a :class:`WeightsNotFound` naming the file and where it was expected.
A metric whose weights are missing is skipped with that note; the run goes on. An existing torch hub cache can be
reused by pointing the root at it (usually ``~/.cache/torch/hub``).

pyiqa loads its checkpoints with ``torch.load(weights_only=False)``; inside :func:`offline_weights` that is forced
to ``weights_only=True`` so that a metric file cannot run code.

PSNR and SSIM are computed on the Y channel of YCbCr (ITU-R BT.601), as SR papers do, after cropping
``crop_border`` pixels from every side (by convention the SR scale). Identical images give PSNR 80 dB (pyiqa's
1e-8 epsilon caps it).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import MissingDependencyError

FR_METRICS = ("psnr", "ssim", "lpips", "dists")
NR_METRICS = ("niqe", "musiq", "maniqa", "clipiqa")
SET_METRICS = ("fid",)
FACE_METRICS = ("id_sim", "face_psnr", "face_lpips")
ALL_METRICS = FR_METRICS + NR_METRICS + SET_METRICS + FACE_METRICS
LOWER_IS_BETTER = {"lpips", "dists", "niqe", "fid", "face_lpips", "seam"}
PSNR_CAP_DB = 80.0  # what pyiqa returns for identical images (10*log10(1/1e-8))

# name -> (pyiqa metric name, extra options); psnr/ssim get crop_border at creation
_PYIQA = {
    "psnr": ("psnry", {"color_space": "ycbcr"}),
    "ssim": ("ssim", {"color_space": "ycbcr", "test_y_channel": True}),
    "lpips": ("lpips", {}),
    "dists": ("dists", {}),
    "niqe": ("niqe", {}),
    "musiq": ("musiq", {}),
    "maniqa": ("maniqa", {}),
    "clipiqa": ("clipiqa", {}),
    "fid": ("fid", {}),
}


class WeightsNotFound(RuntimeError):
    """Raised instead of a download while a metric is being created offline."""

    def __init__(self, url: str, dst: str | None):
        name = os.path.basename(url.split("?")[0]) or url
        where = f" (expected at {dst})" if dst else ""
        super().__init__(f"missing weights file {name}{where}; it would be downloaded from {url}")
        self.url, self.dst, self.filename = url, dst, name


def default_metrics_root() -> Path:
    """``$HEADSUP_METRICS_ROOT``, else ``<HEADSUP_MODEL_ROOT>/metrics``, else ``~/.cache/headsup/metrics``."""
    if os.environ.get("HEADSUP_METRICS_ROOT"):
        return Path(os.environ["HEADSUP_METRICS_ROOT"]).expanduser()
    if os.environ.get("HEADSUP_MODEL_ROOT"):
        return Path(os.environ["HEADSUP_MODEL_ROOT"]).expanduser() / "metrics"
    return Path.home() / ".cache" / "headsup" / "metrics"


@contextlib.contextmanager
def offline_weights(root: str | os.PathLike):
    """Point torch hub, pyiqa and the HF cache at ``root`` and make every download raise WeightsNotFound."""
    import urllib.request

    import torch.hub

    root = Path(root).expanduser().resolve()
    saved: list[tuple[object, str, object]] = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def no_download(url, dst=None, *args, **kwargs):
        raise WeightsNotFound(str(url), None if dst is None else str(dst))

    def no_urlopen(url, *args, **kwargs):  # openai-clip downloads with urlopen into <hub>/clip
        raise WeightsNotFound(getattr(url, "full_url", str(url)), str(root / "clip"))

    real_load = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    old_hub = torch.hub.get_dir()
    old_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    try:
        torch.hub.set_dir(str(root))
        patch(torch.hub, "download_url_to_file", no_download)
        patch(urllib.request, "urlopen", no_urlopen)
        patch(torch, "load", safe_load)
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        with contextlib.suppress(ImportError):
            import huggingface_hub.constants as hfc

            patch(hfc, "HF_HUB_OFFLINE", True)
            patch(hfc, "HF_HUB_CACHE", str(root / "huggingface" / "hub"))
        with contextlib.suppress(ImportError):
            import pyiqa.utils.download_util as du

            patch(du, "DEFAULT_CACHE_DIR", str(root / "pyiqa"))
            patch(du, "download_url_to_file", no_download)
        yield root
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
        torch.hub.set_dir(old_hub)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _import_pyiqa():
    try:
        import pyiqa
    except ImportError as err:
        raise MissingDependencyError(
            f"The metrics need the 'pyiqa' package ({err}); install it with: pip install pyiqa") from None
    return pyiqa


def _why(err: BaseException, root: Path | None = None) -> str:
    """The most useful one-line reason a metric could not be created."""
    cur: BaseException | None = err
    while cur is not None:
        if isinstance(cur, WeightsNotFound):
            return str(cur)
        if type(cur).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            return (f"backbone weights from the Hugging Face Hub (timm/transformers) are missing from "
                    f"{(root or Path('<metrics root>')) / 'huggingface' / 'hub'} and cannot be downloaded offline")
        cur = cur.__cause__ or cur.__context__
    if type(err).__name__ == "UnpicklingError" or "weights_only" in str(err):
        return ("a weights file is not a plain tensor checkpoint and was not unpickled (weights are loaded with "
                "torch.load(weights_only=True) only); use a state-dict copy of it")
    if isinstance(err, ModuleNotFoundError):
        return f"needs the Python module '{err.name}', which is not installed"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


@dataclass
class MetricSuite:
    """Creates the requested metrics once; missing ones are recorded in ``notes`` instead of raising."""

    names: tuple[str, ...] = FR_METRICS + NR_METRICS
    device: str | torch.device = "cpu"
    weights_root: str | os.PathLike | None = None
    crop_border: int = 4
    models: dict = field(default_factory=dict, init=False)
    notes: dict = field(default_factory=dict, init=False)

    def __post_init__(self):
        unknown = [n for n in self.names if n not in ALL_METRICS]
        if unknown:
            raise ValueError(f"Unknown metric(s) {unknown}; choose from {', '.join(ALL_METRICS)}.")
        self.weights_root = Path(self.weights_root or default_metrics_root())
        needed = [n for n in self.names if n in _PYIQA]
        if not needed:
            return
        try:
            pyiqa = _import_pyiqa()
        except MissingDependencyError as err:
            self.notes.update({n: str(err) for n in needed})
            return
        with offline_weights(self.weights_root):
            for name in needed:
                iqa_name, opts = _PYIQA[name]
                opts = dict(opts)
                if name in ("psnr", "ssim"):
                    opts["crop_border"] = int(self.crop_border)
                try:
                    # pyiqa prints "Downloading: ..." before the (blocked) download; keep that off the console
                    with contextlib.redirect_stdout(io.StringIO()):
                        self.models[name] = pyiqa.create_metric(iqa_name, device=torch.device(self.device), **opts)
                except Exception as err:  # any failure to build a metric is a note, never a crash
                    self.notes[name] = _why(err, Path(self.weights_root))

    @property
    def available(self) -> list[str]:
        return list(self.models)

    def _run(self, name, *args) -> float | None:
        model = self.models.get(name)
        if model is None:
            return None
        try:
            with torch.no_grad():
                return float(model(*[a.to(model.device if hasattr(model, "device") else "cpu") for a in args]
                                   ).mean())
        except Exception as err:  # e.g. an image smaller than the metric's patch size
            self.notes.setdefault(name, f"failed on an image: {_why(err)}")
            return None

    def full_reference(self, sr: torch.Tensor, gt: torch.Tensor) -> dict[str, float | None]:
        """FR metrics for one pair of 1x3xHxW tensors in 0..1 of the same size."""
        if sr.shape != gt.shape:
            raise ValueError(f"SR {tuple(sr.shape)} and GT {tuple(gt.shape)} differ in size.")
        sr, gt = sr.float().clamp(0, 1), gt.float().clamp(0, 1)
        return {n: self._run(n, sr, gt) for n in FR_METRICS if n in self.names}

    def no_reference(self, sr: torch.Tensor) -> dict[str, float | None]:
        sr = sr.float().clamp(0, 1)
        return {n: self._run(n, sr) for n in NR_METRICS if n in self.names}

    def fid(self, sr_dir: str | os.PathLike, gt_dir: str | os.PathLike) -> float | None:
        """FID between two folders (unreliable below a few hundred images; the report says so)."""
        model = self.models.get("fid")
        if model is None:
            return None
        try:
            with torch.no_grad():
                return float(model(str(sr_dir), str(gt_dir)))
        except Exception as err:
            self.notes.setdefault("fid", f"failed: {_why(err)}")
            return None


def psnr(a, b, peak: float = 1.0, min_mse: float = 0.0, mask=None) -> float:
    """PSNR in dB of ``a`` against ``b`` (tensors or arrays of one shape, values up to ``peak``), in float64; inf
    for identical inputs unless ``min_mse`` floors the error (training logs average it, so keep it finite).
    ``mask`` (broadcastable, e.g. Bx1xHxW): only where it is non-zero, weighted by it."""
    if mask is not None:
        d = (torch.as_tensor(a).double() - torch.as_tensor(b).double()) ** 2
        w = torch.as_tensor(mask).double().expand_as(d)
        mse = max(float((d * w).sum() / max(float(w.sum()), 1.0)), min_mse)
        return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        mse = float(((torch.as_tensor(a).double() - torch.as_tensor(b).double()) ** 2).mean())
    else:
        mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    mse = max(mse, min_mse)
    return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def psnr_y(a: torch.Tensor, b: torch.Tensor, crop_border: int = 0) -> float:
    """Plain Y-channel PSNR (BT.601) without pyiqa, used for face regions; inf for identical crops."""
    w = torch.tensor([65.481, 128.553, 24.966], dtype=torch.float64).view(1, 3, 1, 1) / 255.0
    ya = (a.double() * w).sum(1) + 16 / 255.0
    yb = (b.double() * w).sum(1) + 16 / 255.0
    if crop_border:
        ya = ya[..., crop_border:-crop_border, crop_border:-crop_border]
        yb = yb[..., crop_border:-crop_border, crop_border:-crop_border]
    return psnr(ya, yb)


def _iou(a, b) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def face_metrics(sr_u8: np.ndarray, gt_u8: np.ndarray, analyzer, suite: MetricSuite | None = None,
                 gt_faces=None, margin: float = 0.2, identity=None) -> tuple[dict, list[dict]]:
    """ID similarity (SR vs GT identity) and face-region PSNR/LPIPS on the GT's detected faces.

    The SR face is described at the GT face's landmarks (``analyzer.embed(sr, gt_kps)``), so a face the model
    blurred or distorted is still measured, never dropped; ID similarity is on the common identity scale of
    ``faces.identity`` (ArcFace cosine; other identity models calibrated to it). The SR image is also run through
    the detector: ``sr_detected`` per face (a detection with box IoU > 0.3) and ``faces_missed`` in the means
    count the faces the detector no longer finds in the SR output. ``identity`` (a ``faces.identity_net``
    ``IdentityEmbedder``, e.g. the torch dlib network) describes both SR and GT faces at the GT landmarks in one
    batch instead of the analyzer's own recognizer.
    """
    from ..faces.identity import to_common

    gt_faces = analyzer.detect(gt_u8) if gt_faces is None else gt_faces
    sr_faces = analyzer.detect(sr_u8) if gt_faces else []
    kind = getattr(identity or analyzer, "kind" if identity is not None else "identity_kind", "arcface")
    embed = getattr(analyzer, "embed", None)
    pairs = None
    if identity is not None and gt_faces:
        kps = [f.kps for f in gt_faces]
        pairs = list(zip(identity.embed_many(np.ascontiguousarray(sr_u8), kps),
                         identity.embed_many(np.ascontiguousarray(gt_u8), kps)))
    h, w = gt_u8.shape[:2]
    rows = []
    for i, gf in enumerate(gt_faces):
        x1, y1, x2, y2 = [float(v) for v in gf.bbox]
        mx, my = (x2 - x1) * margin, (y2 - y1) * margin
        x1, y1 = int(max(0, x1 - mx)), int(max(0, y1 - my))
        x2, y2 = int(min(w, x2 + mx)), int(min(h, y2 + my))
        row: dict = {"face": i, "box": [x1, y1, x2, y2], "id_sim": None, "face_psnr": None, "face_lpips": None}
        if x2 - x1 >= 8 and y2 - y1 >= 8:
            a = torch.from_numpy(np.ascontiguousarray(sr_u8[y1:y2, x1:x2])).permute(2, 0, 1)[None].float() / 255
            b = torch.from_numpy(np.ascontiguousarray(gt_u8[y1:y2, x1:x2])).permute(2, 0, 1)[None].float() / 255
            row["face_psnr"] = min(psnr_y(a, b), PSNR_CAP_DB)
            if suite is not None and "lpips" in suite.models:
                row["face_lpips"] = suite._run("lpips", a, b)
        best = max(sr_faces, key=lambda f: _iou(f.bbox, gf.bbox), default=None)
        row["sr_detected"] = best is not None and _iou(best.bbox, gf.bbox) > 0.3
        if pairs is not None:
            sr_emb, gt_emb = pairs[i]
        else:
            gt_emb = gf.embedding
            sr_emb = embed(np.ascontiguousarray(sr_u8), gf.kps) if embed is not None else None
            if sr_emb is None and row["sr_detected"]:  # an analyzer without embed(): the detected SR face
                sr_emb = best.embedding
        if sr_emb is not None and gt_emb is not None:
            ea, eb = np.asarray(sr_emb, np.float64), np.asarray(gt_emb, np.float64)
            row["id_sim"] = to_common(float(ea @ eb / (np.linalg.norm(ea) * np.linalg.norm(eb) + 1e-12)), kind)
        rows.append(row)
    means = {}
    for key in FACE_METRICS:
        vals = [r[key] for r in rows if r[key] is not None]
        means[key] = float(np.mean(vals)) if vals else None
    means["faces"] = len(rows)
    means["faces_missed"] = sum(1 for r in rows if not r["sr_detected"])
    return means, rows
