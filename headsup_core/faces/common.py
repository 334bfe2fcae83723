"""Shared pieces of the face backends: the ``FaceAnalyzer`` protocol, input checks, licence notes, onnxruntime
provider resolution and the insightface ArcFace embedding helper.

Every backend module imports from here (never from another backend), so there are no import cycles.
"""
from __future__ import annotations

import logging
import warnings
from typing import Protocol, runtime_checkable

import numpy as np

from ..errors import InputImageError, MissingDependencyError
from .types import DetectedFace

log = logging.getLogger(__name__)

# onnxruntime providers that mean "run on a GPU"; asking for one that is missing is an error, never a fallback.
GPU_PROVIDERS = ("CUDAExecutionProvider", "ROCMExecutionProvider", "MIGraphXExecutionProvider",
                 "TensorrtExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider")


@runtime_checkable
class FaceAnalyzer(Protocol):
    """What the pipeline, references, dataset builder and eval need from a face backend.

    * ``detect(rgb_uint8) -> list[DetectedFace]``, largest face first; landmarks in our 5-point convention
      (left eye, right eye, nose tip, left and right mouth corner, image left/right) and, with a recognizer,
      an L2-normalised identity embedding.
    * ``embed(rgb_uint8, kps) -> embedding | None``: the identity of the face with landmarks ``kps``.
    * ``parse_mask(aligned_512_crop) -> HxW float mask | None``: a face-parsing mask (None: use the ellipse).
    * ``backend`` (name), ``has_recognizer``, ``identity_kind`` (which identity model made the embeddings,
      see ``faces.identity``) and ``licence`` (a one-line note about the weights).
    """

    backend: str
    has_recognizer: bool
    identity_kind: str

    def detect(self, image: np.ndarray) -> list[DetectedFace]: ...

    def embed(self, image: np.ndarray, kps: np.ndarray) -> np.ndarray | None: ...

    def parse_mask(self, crop: np.ndarray) -> np.ndarray | None: ...


class AnalyzerBase:
    """Defaults shared by the concrete backends (no parsing, ArcFace identity space)."""

    backend = "none"
    has_recognizer = False
    identity_kind = "arcface"
    licence = ""

    def parse_mask(self, crop: np.ndarray) -> np.ndarray | None:
        return None

    def embed(self, image: np.ndarray, kps: np.ndarray) -> np.ndarray | None:  # pragma: no cover - overridden
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r}, recognizer={self.has_recognizer})"


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


def log_licence(path, level=logging.WARNING) -> str | None:
    """State the licence of the weights being loaded (insightface packs are non-commercial)."""
    from ..licences import describe_licence

    note = describe_licence(str(path))
    if note:
        log.log(level, note)
    return note


# ------------------------------------------------------------------------------------------ onnxruntime
def ort_module():
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError("The insightface face backend needs onnxruntime: pip install onnxruntime "
                                     "(or onnxruntime-gpu for CUDA).") from None
    return onnxruntime


def provider_name(p) -> str:
    return str(p[0]) if isinstance(p, (list, tuple)) else str(p)


def resolve_providers(providers=None, device=None) -> list:
    """Pick onnxruntime providers; a requested GPU provider that onnxruntime lacks raises, never falls back."""
    available = list(ort_module().get_available_providers())
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
    missing = [provider_name(p) for p in providers if provider_name(p) not in available]
    if missing:
        hint = ("install onnxruntime-gpu matching your CUDA version (and uninstall plain onnxruntime)"
                if any(m in GPU_PROVIDERS for m in missing) else "choose one of the available providers")
        raise MissingDependencyError(f"onnxruntime provider(s) {missing} were requested but this onnxruntime offers "
                                     f"only {available}; {hint}, or run face analysis on the CPU.")
    return providers


def embed_with_arcface(rec_model, image: np.ndarray, kps: np.ndarray) -> np.ndarray | None:
    """Identity of one face with an insightface ArcFace model (aligned by insightface's own norm_crop)."""
    if rec_model is None:
        return None
    from insightface.app.common import Face

    face = Face(bbox=None, kps=np.asarray(kps, np.float32), det_score=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return normalise(rec_model.get(np.ascontiguousarray(image[:, :, ::-1]), face))
