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
from .common import (GPU_PROVIDERS, AnalyzerBase, FaceAnalyzer, check_image, embed_with_arcface,  # noqa: F401
                     log_licence, normalise, provider_name, resolve_providers)
from .types import DetectedFace

log = logging.getLogger(__name__)

PREFERRED_PACKS = ("antelopev2", "buffalo_l")
BACKENDS = ("auto", "insightface", "dlib", "facexlib", "none")


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


class InsightFaceAnalyzer(AnalyzerBase):
    backend = "insightface"
    identity_kind = "arcface"

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
        self.licence = log_licence(self.pack_dir) or "insightface pack: licence unknown, check its source"
        log.info("insightface pack %s on %s", self.pack_dir, [provider_name(p) for p in providers])
        app.prepare(ctx_id=0, det_size=tuple(det_size), det_thresh=det_thresh)
        self.app = app
        self.providers = providers
        self.has_recognizer = "recognition" in app.models

    @staticmethod
    def _check_active_providers(app, providers) -> None:
        wanted = [provider_name(p) for p in providers if provider_name(p) in GPU_PROVIDERS]
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


def load_face_analyzer(backend: str = "insightface", model_root=None, pack=None, providers=None, device=None,
                       **options) -> FaceAnalyzer | None:
    """Load a face analyzer.

    * ``backend="auto"``: the first that is available, in this order: an installed insightface pack (under
      ``model_root``, default ``~/.insightface``), dlib (``pip install dlib-bin face-recognition-models``),
      facexlib weights (in ``facexlib_root=``), else None. Logs which one it took and that model's licence.
    * ``backend="insightface"``: ``model_root`` holds ``models/<pack>/*.onnx`` (default ``~/.insightface``; in
      ComfyUI ``models/insightface``); ``pack`` is a pack name or folder (default: antelopev2, buffalo_l, or the
      only pack present). ``providers`` are onnxruntime providers, or ``device`` ("cpu", "cuda:0") picks them.
      Options: ``det_size=(640, 640)``, ``det_thresh=0.5``, ``require_recognizer=True``.
    * ``backend="dlib"``: dlib's HOG detector (``detector="mmod"`` for its CNN detector), 5-point landmarks and
      128-d ResNet identity, from the ``face-recognition-models`` package (or ``model_root``, a folder with
      the same .dat files). Options: ``detector``, ``upsample=None`` (auto), ``det_thresh=0.0``,
      ``recognizer=True``, ``num_jitters=0``. Runs on the CPU.
    * ``backend="facexlib"``: ``model_root`` is the folder with facexlib's weights (ComfyUI:
      ``models/facedetection``); runs in torch on ``device``. facexlib has no recognizer, so faces get
      ``embedding=None`` unless ``recognizer=`` names an insightface recognition .onnx (or a pack via ``pack``).
      Options: ``detector="retinaface_resnet50"|"retinaface_mobile0.25"``, ``parsing=False`` (BiSeNet face masks),
      ``det_thresh=0.8``, ``recognizer=None``.
    * ``backend="none"``: None.
    """
    backend = (backend or "").lower()
    if backend == "none":
        return None
    if backend == "auto":
        return load_auto(insightface_root=model_root, pack=pack, providers=providers, device=device, **options)
    if backend == "insightface":
        pack_dir = resolve_pack_dir(model_root, pack)
        return InsightFaceAnalyzer(pack_dir, resolve_providers(providers, device), **options)
    if backend == "dlib":
        from .dlib_backend import load

        return load(model_root, **options)
    if backend == "facexlib":
        from .facexlib_backend import FacexlibAnalyzer

        recognizer = options.pop("recognizer", None)
        if recognizer is None and pack is not None:
            recognizer = pack
        return FacexlibAnalyzer(model_root, device=device, recognizer=recognizer, providers=providers, **options)
    raise FaceError(f"Unknown face backend {backend!r}; use one of {', '.join(BACKENDS)}.")


def find_backends(insightface_root=None, facexlib_root=None) -> list[tuple[str, str, str]]:
    """Installed face backends in ``auto``'s order: (backend, where, licence note). Loads nothing."""
    import importlib.util

    from ..licences import describe_licence
    from . import dlib_backend

    found = []
    if importlib.util.find_spec("insightface") is not None and importlib.util.find_spec("onnxruntime") is not None:
        try:
            pack_dir = resolve_pack_dir(insightface_root, None)
        except HeadsUpError:
            pack_dir = None
        if pack_dir is not None:
            found.append(("insightface", str(pack_dir), describe_licence(str(pack_dir)) or
                          f"insightface pack {pack_dir.name}: licence unknown, check where it came from"))
    if dlib_backend.available():
        found.append(("dlib", str(dlib_backend.default_model_dir()), dlib_backend.LICENCE))
    if facexlib_root is not None and importlib.util.find_spec("facexlib") is not None:
        from .facexlib_backend import DETECTOR_FILES

        for name, file in DETECTOR_FILES.items():
            path = Path(os.path.expanduser(str(facexlib_root))) / file
            if path.is_file():
                found.append(("facexlib", str(path), describe_licence(str(path)) or "facexlib: MIT"))
                break
    return found


def load_auto(insightface_root=None, facexlib_root=None, pack=None, providers=None, device=None,
              **options) -> FaceAnalyzer | None:
    """``faces="auto"``: insightface pack, then dlib, then facexlib weights, then None (see load_face_analyzer).
    A backend that is present but fails to load is skipped with a warning."""
    for backend, where, note in find_backends(insightface_root, facexlib_root):
        try:
            if backend == "insightface":
                analyzer = load_face_analyzer("insightface", model_root=insightface_root, pack=pack,
                                              providers=providers, device=device)
            elif backend == "dlib":
                analyzer = load_face_analyzer("dlib")
            else:
                from .facexlib_backend import DETECTOR_FILES

                detector = next(k for k, v in DETECTOR_FILES.items() if where.endswith(v))
                analyzer = load_face_analyzer("facexlib", model_root=facexlib_root, device=device,
                                              detector=detector)
        except HeadsUpError as err:
            log.warning("faces=auto: %s at %s could not be loaded (%s); trying the next backend", backend, where, err)
            continue
        log.info("faces=auto: using the %s face backend (%s). Licence: %s", backend, where, note)
        analyzer.auto_note = f"{backend} ({where}); licence: {note}"
        return analyzer
    log.warning("faces=auto: no face backend found (no insightface pack, dlib not installed, no facexlib "
                "weights): no face mask and no references. pip install dlib-bin face-recognition-models")
    return None


NO_FACE_BACKEND = ("Face analysis needs a face backend, and none is installed: pip install dlib-bin "
                   "face-recognition-models (commercial use allowed), or add an insightface pack "
                   "(insightface/models/<pack>/) or facexlib weights (facedetection/).")


def choose_face_analyzer(backend: str = "auto", insightface_root=None, facexlib_root=None, dlib_root=None,
                         pack=None, providers=None, device=None, required: bool = False,
                         **options) -> FaceAnalyzer | None:
    """The face-backend choice of every front end (CLI ``--faces``, the ComfyUI loader, the A1111 extension).

    ``auto``: an insightface pack under ``insightface_root``, then dlib, then facexlib weights in
    ``facexlib_root`` (``load_auto``, which logs the choice and its licence); any other backend loads from its own
    root. ``required`` (a reference was given): no analyzer is an error, in the same sentence everywhere."""
    backend = (backend or "auto").lower()
    if backend == "auto":
        analyzer = load_auto(insightface_root=insightface_root, facexlib_root=facexlib_root, pack=pack,
                             providers=providers, device=device, **options)
    else:
        root = {"insightface": insightface_root, "dlib": dlib_root, "facexlib": facexlib_root}.get(backend)
        analyzer = load_face_analyzer(backend, model_root=root, pack=pack, providers=providers, device=device,
                                      **options)
    if analyzer is None and required:
        if backend == "none":
            raise InputImageError("A reference needs face analysis, but faces are off (none): use auto, dlib, "
                                  "insightface or facexlib.")
        raise MissingModelError(NO_FACE_BACKEND)
    return analyzer
