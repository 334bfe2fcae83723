"""Face analysis backends behind one interface: ``FaceAnalyzer.detect(rgb_uint8) -> list[DetectedFace]``.

insightface packs live in ``<model_root>/models/<pack>/*.onnx`` (ComfyUI: ``models/insightface``) and are loaded
with insightface's own ``FaceAnalysis`` / ``model_zoo``; nothing is ever downloaded. facexlib lives in
``facexlib_backend.py``.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np

from ..errors import FaceError, HeadsUpError, InputImageError, MissingDependencyError, MissingModelError
from .types import DetectedFace

log = logging.getLogger(__name__)

PREFERRED_PACKS = ("antelopev2", "buffalo_l")
# onnxruntime providers that mean "run on a GPU"; asking for one that is missing is an error, never a fallback.
GPU_PROVIDERS = ("CUDAExecutionProvider", "ROCMExecutionProvider", "MIGraphXExecutionProvider",
                 "TensorrtExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider")


def normalise(v) -> np.ndarray | None:
    if v is None:
        return None
    v = np.asarray(v, dtype=np.float32).ravel()
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else None


def check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = getattr(image, "shape", type(image).__name__)
        raise InputImageError(f"Face detection needs an HxWx3 uint8 RGB array, got {got}.")
    return image


class FaceAnalyzer:
    """Base class: ``detect`` returns faces sorted by descending area."""

    backend = "none"
    has_recognizer = False

    def detect(self, image: np.ndarray) -> list[DetectedFace]:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r}, recognizer={self.has_recognizer})"


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError("The insightface face backend needs onnxruntime: pip install onnxruntime "
                                     "(or onnxruntime-gpu for CUDA).") from None
    return onnxruntime


def _provider_name(p) -> str:
    return str(p[0]) if isinstance(p, (list, tuple)) else str(p)


def resolve_providers(providers=None, device=None) -> list:
    """Pick onnxruntime providers; a requested GPU provider that onnxruntime lacks raises, never falls back."""
    available = list(_ort().get_available_providers())
    if providers is None:
        dev = str(device or "").lower()
        if dev.startswith("cpu"):
            providers = ["CPUExecutionProvider"]
        elif dev.startswith(("cuda", "rocm")):
            name = "ROCMExecutionProvider" if dev.startswith("rocm") else "CUDAExecutionProvider"
            dev_id = int(dev.split(":")[1]) if ":" in dev else 0
            providers = [(name, {"device_id": dev_id}), "CPUExecutionProvider"]
        else:  # no preference: the best GPU provider onnxruntime offers, then the CPU for unsupported ops
            gpu = [p for p in ("CUDAExecutionProvider", "ROCMExecutionProvider") if p in available]
            providers = gpu[:1] + ["CPUExecutionProvider"]
    providers = [providers] if isinstance(providers, str) else list(providers)
    missing = [_provider_name(p) for p in providers if _provider_name(p) not in available]
    if missing:
        hint = ("install onnxruntime-gpu matching your CUDA version (and uninstall plain onnxruntime)"
                if any(m in GPU_PROVIDERS for m in missing) else "choose one of the available providers")
        raise MissingDependencyError(f"onnxruntime provider(s) {missing} were requested but this onnxruntime offers "
                                     f"only {available}; {hint}, or run face analysis on the CPU.")
    return providers


def resolve_pack_dir(model_root=None, pack=None) -> Path:
    """``<model_root>/models/<pack>``; ``pack`` may also be a folder path. With no pack, pick a known one."""
    if pack is not None:
        direct = Path(os.path.expanduser(str(pack)))
        if direct.is_absolute() or len(direct.parts) > 1:  # a folder path rather than a pack name
            if not direct.is_dir():
                raise MissingModelError(f"insightface model pack folder not found: {direct}; it should hold the "
                                        "pack's .onnx files.")
            return direct
    root = Path(os.path.expanduser(str(model_root))) if model_root is not None else Path.home() / ".insightface"
    models = root / "models"
    if pack is not None:
        d = models / str(pack)
        if not d.is_dir():
            raise MissingModelError(f"insightface model pack '{pack}' not found: expected the folder {d} with its "
                                    ".onnx files (e.g. antelopev2 or buffalo_l unpacked there).")
        return _unnest(d)
    found = sorted(p.name for p in models.iterdir() if p.is_dir() and any(_unnest(p).glob("*.onnx"))) \
        if models.is_dir() else []
    for name in PREFERRED_PACKS:
        if name in found:
            return _unnest(models / name)
    if len(found) == 1:
        return _unnest(models / found[0])
    if not found:
        raise MissingModelError(f"No insightface model pack found in {models}; put a pack such as antelopev2 or "
                                f"buffalo_l there as {models / 'antelopev2'}/*.onnx.")
    raise MissingModelError(f"Several insightface packs in {models} ({', '.join(found)}); choose one with pack=NAME.")


def _unnest(pack_dir: Path) -> Path:
    """The antelopev2 zip unpacks to antelopev2/antelopev2/*.onnx; accept that layout too."""
    inner = pack_dir / pack_dir.name
    if not any(pack_dir.glob("*.onnx")) and inner.is_dir() and any(inner.glob("*.onnx")):
        log.info("using the nested pack folder %s", inner)
        return inner
    return pack_dir


class InsightFaceAnalyzer(FaceAnalyzer):
    backend = "insightface"

    def __init__(self, pack_dir: Path, providers: list, det_size=(640, 640), det_thresh: float = 0.5,
                 require_recognizer: bool = True):
        try:
            from insightface.app import FaceAnalysis
        except ImportError:
            raise MissingDependencyError("The insightface face backend needs insightface: pip install insightface") \
                from None
        self.pack_dir = Path(pack_dir)
        onnx_files = sorted(self.pack_dir.glob("*.onnx"))
        if not onnx_files:
            raise MissingModelError(f"The insightface pack folder {self.pack_dir} has no .onnx files; unpack the "
                                    "pack's detector and recognizer .onnx files there.")
        try:
            # A folder path makes FaceAnalysis load it directly (it never downloads an existing folder).
            app = FaceAnalysis(name=str(self.pack_dir), root=str(self.pack_dir.parent.parent),
                               allowed_modules=["detection", "recognition"], providers=providers)
        except AssertionError:  # FaceAnalysis asserts that a detector was found
            raise MissingModelError(f"The insightface pack {self.pack_dir} has no face detector (an SCRFD/RetinaFace "
                                    "model such as det_10g.onnx or scrfd_10g_bnkps.onnx).") from None
        except HeadsUpError:
            raise
        except Exception as err:  # noqa: BLE001 - onnxruntime/protobuf raise many types for a broken file
            raise MissingModelError(f"Cannot load the insightface pack {self.pack_dir}: {err}. Check that its .onnx "
                                    "files are complete.") from None
        if "recognition" not in app.models:
            if require_recognizer:
                raise MissingModelError(f"The insightface pack {self.pack_dir} has no face recognizer (an ArcFace "
                                        "model such as w600k_r50.onnx or glintr100.onnx); identity references "
                                        "need one.")
            log.warning("insightface pack %s has no recognizer: faces get no identity embedding", self.pack_dir)
        self._check_active_providers(app, providers)
        _log_licence(self.pack_dir)
        log.info("insightface pack %s on %s", self.pack_dir, [_provider_name(p) for p in providers])
        app.prepare(ctx_id=0, det_size=tuple(det_size), det_thresh=det_thresh)
        self.app = app
        self.providers = providers
        self.has_recognizer = "recognition" in app.models

    @staticmethod
    def _check_active_providers(app, providers) -> None:
        wanted = [_provider_name(p) for p in providers if _provider_name(p) in GPU_PROVIDERS]
        for task, model in app.models.items():
            active = list(model.session.get_providers())
            lost = [p for p in wanted if p not in active]
            if lost:  # onnxruntime silently drops a provider whose libraries fail to load
                raise MissingDependencyError(f"onnxruntime could not start {lost} for the insightface {task} model "
                                             f"(active: {active}); check the CUDA/cuDNN install, or run on the CPU.")

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        rgb = check_image(image)
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # insightface expects OpenCV's BGR order
        faces = []
        with warnings.catch_warnings():  # insightface's norm_crop uses a scikit-image API deprecated in 0.26
            warnings.simplefilter("ignore", FutureWarning)
            found = self.app.get(bgr)
        for f in found:
            if f.kps is None:
                continue
            faces.append(DetectedFace(bbox=np.asarray(f.bbox, np.float32), kps=np.asarray(f.kps, np.float32),
                                      det_score=float(f.det_score), embedding=normalise(f.get("embedding"))))
        return sorted(faces, key=lambda f: -f.area)

    def embed(self, image: np.ndarray, kps: np.ndarray) -> np.ndarray | None:
        """Identity embedding of the face with landmarks ``kps`` in ``image`` (RGB uint8)."""
        return embed_with_arcface(self.app.models.get("recognition"), image, kps)


def embed_with_arcface(rec_model, image: np.ndarray, kps: np.ndarray) -> np.ndarray | None:
    if rec_model is None:
        return None
    from insightface.app.common import Face

    face = Face(bbox=None, kps=np.asarray(kps, np.float32), det_score=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return normalise(rec_model.get(np.ascontiguousarray(image[:, :, ::-1]), face))


def _log_licence(path) -> None:
    """State the licence of the weights being loaded (insightface packs are non-commercial)."""
    try:
        from ..licences import describe_licence
    except ImportError:  # pragma: no cover - older core
        return
    note = describe_licence(str(path))
    if note:
        log.warning(note)


def load_face_analyzer(backend: str = "insightface", model_root=None, pack=None, providers=None, device=None,
                       **options) -> FaceAnalyzer:
    """Load a face analyzer.

    * ``backend="insightface"``: ``model_root`` holds ``models/<pack>/*.onnx`` (default ``~/.insightface``; in
      ComfyUI ``models/insightface``); ``pack`` is a pack name or folder (default: antelopev2, buffalo_l, or the
      only pack present). ``providers`` are onnxruntime providers, or ``device`` ("cpu", "cuda:0") picks them.
      Options: ``det_size=(640, 640)``, ``det_thresh=0.5``, ``require_recognizer=True``.
    * ``backend="facexlib"``: ``model_root`` is the folder with facexlib's weights (ComfyUI:
      ``models/facedetection``); runs in torch on ``device``. facexlib has no ArcFace recognizer, so faces get
      ``embedding=None`` unless ``recognizer=`` names an insightface recognition .onnx (or a pack via ``pack``).
      Options: ``detector="retinaface_resnet50"|"retinaface_mobile0.25"``, ``parsing=False`` (BiSeNet face masks),
      ``det_thresh=0.8``, ``recognizer=None``.
    """
    backend = (backend or "").lower()
    if backend == "insightface":
        pack_dir = resolve_pack_dir(model_root, pack)
        return InsightFaceAnalyzer(pack_dir, resolve_providers(providers, device), **options)
    if backend == "facexlib":
        from .facexlib_backend import FacexlibAnalyzer

        recognizer = options.pop("recognizer", None)
        if recognizer is None and pack is not None:
            recognizer = pack
        return FacexlibAnalyzer(model_root, device=device, recognizer=recognizer, providers=providers, **options)
    raise FaceError(f"Unknown face backend {backend!r}; use 'insightface' or 'facexlib'.")
