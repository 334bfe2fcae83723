"""A boundary-artifact ("seam") score around a face mask's edge, measured against the GT.

Pasting a face model's output back into a general model's output leaves a discontinuity where the two meet.
We look at the error image ``D = SR - GT`` and its gradient magnitude ``|grad D|`` (Sobel, summed over RGB, in
8-bit levels per pixel):

- ``ring``: pixels within ``ring_width`` px of the mask's 0.5 level line (the paste boundary);
- ``bands``: the pixels ``ring_width``..``3*ring_width`` px further in and out.

``seam = max(0, mean_ring |grad D| - mean_bands |grad D|)``: the *excess* error gradient on the boundary. An SR
result with errors spread evenly (noise, blur) scores about 0; the GT itself scores exactly 0; a hard paste with a
colour or texture change across the edge scores high; a feathered paste spreads the step over the feather width
and scores lower. ``seam_colour`` is the mean colour step of ``D`` across the boundary (inner vs outer band), in
8-bit levels.
"""
from __future__ import annotations

import numpy as np

from ..errors import MissingDependencyError


def _cv2():
    try:
        import cv2
    except ImportError:
        raise MissingDependencyError(
            "The seam metric needs OpenCV; install it with: pip install opencv-python-headless") from None
    return cv2


def _as_float(img) -> np.ndarray:
    """HxWx3 uint8 / float 0..1 array or 1x3xHxW tensor -> HxWx3 float32 in 0..255."""
    if hasattr(img, "detach"):
        img = img.detach().float().cpu().numpy()
        if img.ndim == 4:
            img = img[0]
        img = np.transpose(img, (1, 2, 0)) * 255.0
    img = np.asarray(img)
    return img.astype(np.float32) if img.dtype == np.uint8 else img.astype(np.float32) * 255.0


def _as_mask(mask) -> np.ndarray:
    if hasattr(mask, "detach"):
        mask = mask.detach().float().cpu().numpy()
    mask = np.asarray(mask, dtype=np.float32)
    while mask.ndim > 2:
        mask = mask[0]
    return mask


def boundary_regions(mask, ring_width: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ring, inner band, outer band) boolean maps around the 0.5 level line of ``mask``."""
    cv2 = _cv2()
    inside = (_as_mask(mask) >= 0.5).astype(np.uint8)
    # distance of every pixel to the nearest pixel of the other side
    d_in = cv2.distanceTransform(inside, cv2.DIST_L2, 5)
    d_out = cv2.distanceTransform(1 - inside, cv2.DIST_L2, 5)
    r = float(ring_width)
    ring = ((inside > 0) & (d_in <= r)) | ((inside == 0) & (d_out <= r))
    inner = (inside > 0) & (d_in > r) & (d_in <= 3 * r)
    outer = (inside == 0) & (d_out > r) & (d_out <= 3 * r)
    return ring, inner, outer


def seam_score(sr, gt, mask, ring_width: int = 3) -> dict[str, float]:
    """Seam score of ``sr`` against ``gt`` along the edge of ``mask`` (see the module docstring).

    Returns ``{"seam", "seam_colour", "ring", "bands"}``; all are 0.0 when the mask has no edge.
    """
    cv2 = _cv2()
    a, b = _as_float(sr), _as_float(gt)
    if a.shape != b.shape:
        raise ValueError(f"SR {a.shape} and GT {b.shape} differ in size.")
    m = _as_mask(mask)
    if m.shape != a.shape[:2]:
        m = cv2.resize(m, (a.shape[1], a.shape[0]), interpolation=cv2.INTER_LINEAR)
    ring, inner, outer = boundary_regions(m, ring_width)
    if not ring.any():
        return {"seam": 0.0, "seam_colour": 0.0, "ring": 0.0, "bands": 0.0}
    d = a - b
    gx = cv2.Sobel(d, cv2.CV_32F, 1, 0, ksize=3) / 8.0  # /8: Sobel's weights sum to 8 per side
    gy = cv2.Sobel(d, cv2.CV_32F, 0, 1, ksize=3) / 8.0
    grad = np.sqrt(gx ** 2 + gy ** 2).sum(axis=2)
    bands = inner | outer
    ring_err = float(grad[ring].mean())
    band_err = float(grad[bands].mean()) if bands.any() else 0.0
    colour = 0.0
    if inner.any() and outer.any():
        colour = float(np.linalg.norm(d[inner].mean(axis=0) - d[outer].mean(axis=0)))
    return {"seam": max(0.0, ring_err - band_err), "seam_colour": colour, "ring": ring_err, "bands": band_err}
