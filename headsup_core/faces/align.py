"""5-point similarity alignment (the FFHQ 512 and ArcFace 112 templates live here only) and region warping.

The least-squares similarity fit is scikit-image's (Umeyama), the warping is OpenCV's.
"""
from __future__ import annotations

import numpy as np

from ..errors import MissingDependencyError

CROP_SIZE = 512
# The 5-point FFHQ template for 512x512 crops used by facexlib's FaceRestoreHelper (GFPGAN, CodeFormer):
# left eye, right eye, nose, left mouth corner, right mouth corner.
FFHQ_512 = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                     [201.26117, 371.41043], [313.08905, 371.15118]], dtype=np.float32)
# insightface's ArcFace 112x112 template (``arcface_dst``), the same five points for recognizer crops.
ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)
# The face region in template coordinates (ellipse centre and semi-axes), forehead to chin, ear to ear.
FACE_ELLIPSE_512 = ((256.0, 300.0), (150.0, 195.0))


def cv2_module():
    try:
        import cv2
    except ImportError:
        raise MissingDependencyError("Face alignment needs OpenCV: pip install opencv-python-headless") from None
    return cv2


def template(size: int = CROP_SIZE) -> np.ndarray:
    return FFHQ_512 * (size / CROP_SIZE)


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, translation) mapping src points to dst.

    Returns the 2x3 matrix in OpenCV's convention (pixel centres at integer coordinates).
    """
    try:
        from skimage.transform import SimilarityTransform
    except ImportError:
        raise MissingDependencyError("Face alignment needs scikit-image: pip install scikit-image") from None
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        tform = SimilarityTransform.from_estimate(src, dst)
        if not tform:
            raise ValueError("degenerate landmarks: no similarity transform fits them")
    else:  # pragma: no cover - older scikit-image
        tform = SimilarityTransform()
        if not tform.estimate(src, dst):
            raise ValueError("degenerate landmarks: no similarity transform fits them")
    return np.asarray(tform.params[:2], dtype=np.float64)


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return (pts @ matrix[:, :2].T + matrix[:, 2]).astype(np.float32)


def scale_of(matrix: np.ndarray) -> float:
    return float(np.hypot(matrix[0, 0], matrix[1, 0]))


def align_face(image: np.ndarray, kps: np.ndarray, size: int = CROP_SIZE) -> tuple[np.ndarray, np.ndarray, float]:
    """Crop an FFHQ-aligned ``size``² face. Returns (crop, kps in crop coordinates, frontal score in (0, 1])."""
    cv2 = cv2_module()
    dst = template(size)
    m = estimate_similarity(kps, dst)
    crop = cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT_101)
    crop_kps = apply(m, kps)
    # Residual of the 5-point fit relative to the eye distance: 0 for a frontal face, large for a profile.
    eye_dist = float(np.linalg.norm(dst[1] - dst[0]))
    residual = float(np.sqrt(np.mean(np.sum((crop_kps - dst) ** 2, axis=1)))) / eye_dist
    return crop, crop_kps, float(np.exp(-4.0 * residual))


def roi_of(points: np.ndarray, shape_hw: tuple[int, int], margin: float = 0.0):
    """Integer (x0, y0, x1, y1) box around points, grown by ``margin`` px and clipped to the image; None if empty."""
    h, w = shape_hw
    x0 = int(np.floor(points[:, 0].min() - margin))
    y0 = int(np.floor(points[:, 1].min() - margin))
    x1 = int(np.ceil(points[:, 0].max() + margin)) + 1
    y1 = int(np.ceil(points[:, 1].max() + margin)) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def warp_into_roi(src: np.ndarray, matrix: np.ndarray, roi, flags=None, border_value=0) -> np.ndarray:
    """Warp ``src`` with ``matrix`` (src -> full image coordinates) but render only the ``roi`` window."""
    cv2 = cv2_module()
    x0, y0, x1, y1 = roi
    m = matrix.copy()
    m[:, 2] -= (x0, y0)
    return cv2.warpAffine(src, m, (x1 - x0, y1 - y0), flags=cv2.INTER_CUBIC if flags is None else flags,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=border_value)
