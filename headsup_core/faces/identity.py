"""Identity similarity on one common scale, whichever identity model made the embeddings.

Embeddings are always stored L2-normalised, so their dot product is the model's own (native) cosine. Each
identity model has its own native scale: two strangers score about 0.0-0.2 with ArcFace (insightface) but
0.78-0.91 with dlib's ResNet descriptor. Everything that compares identities (reference -> face matching,
the dataset's identity groups, eval's ID similarity, the reports) converts the native cosine to the common
scale below, so that one threshold means the same thing for every backend:

* ``MATCH_THRESHOLD`` (0.3): a reference may go on a face (the pipeline's and the node's default);
* ``SAME_PERSON_THRESHOLD`` (0.65): two faces are confidently the same person (PortraitSR-4K's reference-pair
  rule, stated for ArcFace).

ArcFace's cosine *is* the common scale. Other models map their native cosine through a monotone piecewise-linear
calibration whose anchors are their own thresholds (see ``CALIBRATIONS`` and docs/faces.md for the measured
numbers), so the order of similarities, and hence every matching decision, is the native model's own.
"""
from __future__ import annotations

import numpy as np

from ..errors import FaceError

MATCH_THRESHOLD = 0.3
SAME_PERSON_THRESHOLD = 0.65

# identity kind -> (native cosine anchors, common-scale values); None means the native cosine is the common scale.
CALIBRATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "arcface": None,
    # dlib_face_recognition_resnet_model_v1: descriptors have norm ~1.4-1.6, so dlib's own Euclidean same-person
    # radius 0.6 (LFW-calibrated) is a native cosine of ~0.915 and its clustering radius 0.5 is ~0.94 (fitted
    # cos = 1 - 0.235 d^2 on real photos). Strangers in t1.jpg / astronaut: native 0.78-0.91; the same face
    # flipped, colour-jittered or downscaled x0.5: 0.983-0.998.
    "dlib_resnet_v1": ((-1.0, 0.80, 0.915, 0.94, 1.0), (-1.0, 0.0, MATCH_THRESHOLD, SAME_PERSON_THRESHOLD, 1.0)),
}


def to_common(native, kind: str = "arcface"):
    """Map native cosine(s) of identity model ``kind`` to the common scale (same shape; floats stay floats)."""
    cal = CALIBRATIONS.get(kind or "arcface", None)
    if kind not in CALIBRATIONS and kind:
        raise FaceError(f"Unknown identity model {kind!r}; known: {', '.join(CALIBRATIONS)}.")
    arr = np.asarray(native, dtype=np.float64)
    out = arr if cal is None else np.interp(arr, cal[0], cal[1])
    return float(out) if np.ndim(native) == 0 else out.astype(np.float32)


def native_threshold(common: float, kind: str = "arcface") -> float:
    """The native cosine that maps to ``common`` (for reports and docs)."""
    cal = CALIBRATIONS.get(kind or "arcface")
    return float(common) if cal is None else float(np.interp(common, cal[1], cal[0]))


def similarity(a, b, kind: str = "arcface") -> float:
    """Common-scale identity similarity of two embeddings of the same identity model."""
    a, b = np.asarray(a, np.float32).ravel(), np.asarray(b, np.float32).ravel()
    if a.shape != b.shape:
        raise FaceError(f"Cannot compare identity embeddings of different models ({a.size}-d vs {b.size}-d); "
                        "encode references and faces with the same face analyzer.")
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
    return to_common(cos, kind)
