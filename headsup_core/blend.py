"""The blending baseline ("OSEDiff + OSEDiff-face"): general SR, face SR on aligned crops, feathered paste-back.

This is what FaceDetailer / CodeFormer-style pipelines do today and what HeadsUp replaces:

1. the general model upscales the whole image;
2. each face detected in the LQ image is cut out FFHQ-aligned (5-point similarity transform) at
   ``crop_size / scale`` LQ pixels, and the face model upscales that crop to ``crop_size``² (512² by default);
3. the restored crop goes back through the inverse affine warp, blended with a feathered mask (the crop square
   shrunk by ``margin`` and Gaussian-blurred by ``feather`` crop pixels; ``feather=0`` is a hard paste).

Both models are ordinary :class:`headsup_core.pipeline.HeadsUpPipeline` objects (any HeadsUp/OSEDiff weights);
no second copy of the diffusion logic lives here.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from .errors import InputImageError
from .faces.align import CROP_SIZE, apply, cv2_module, estimate_similarity, roi_of, template, warp_into_roi
from .imageio import from_batch, tensor_to_uint8, to_batch


def _feather_mask(size: int, margin: float, feather: float) -> np.ndarray:
    """Crop-space paste mask: ones inside the square shrunk by ``margin`` px, edges blurred by ``feather`` px."""
    cv2 = cv2_module()
    m = np.zeros((size, size), np.float32)
    k = int(round(margin))
    m[k:size - k, k:size - k] = 1.0
    if feather > 0:
        sigma = feather / 2.0
        ksize = int(2 * round(3 * sigma) + 1)
        m = cv2.GaussianBlur(m, (ksize, ksize), sigma, borderType=cv2.BORDER_CONSTANT)
    return m


def face_crop_transform(kps_lq: np.ndarray, scale: float, crop_size: int = CROP_SIZE) -> tuple[np.ndarray, int]:
    """Similarity transforms for one face given its LQ landmarks.

    Returns ``(m_out, lq_crop)``: ``m_out`` maps output-image pixels to the aligned ``crop_size``² crop, and the
    LQ crop is ``lq_crop``² pixels (``crop_size / scale``, rounded).
    """
    # pixel-centre convention: a point p in the LQ is at (p + 0.5) * s - 0.5 in the output
    kps_out = (np.asarray(kps_lq, np.float64) + 0.5) * scale - 0.5
    m_out = estimate_similarity(kps_out, template(crop_size))
    return m_out, max(8, int(round(crop_size / scale)))


def _lq_matrix(m_out: np.ndarray, scale: float, lq_crop: int, crop_size: int) -> np.ndarray:
    """LQ pixel -> LQ-crop pixel: output coordinates of the LQ point, through m_out, shrunk to the LQ crop."""
    k = lq_crop / crop_size
    to_out = np.array([[scale, 0, 0.5 * scale - 0.5], [0, scale, 0.5 * scale - 0.5], [0, 0, 1]], np.float64)
    m3 = np.vstack([m_out, [0, 0, 1]]) @ to_out
    shrink = np.array([[k, 0, 0.5 * k - 0.5], [0, k, 0.5 * k - 0.5], [0, 0, 1]], np.float64)
    return (shrink @ m3)[:2]


def paste_face(base: np.ndarray, face: np.ndarray, m_out: np.ndarray, mask_crop: np.ndarray,
               acc_mask: np.ndarray | None = None) -> np.ndarray:
    """Blend ``face`` (crop_size² uint8) into ``base`` (HxWx3 uint8) through the inverse of ``m_out``.

    Only the face's bounding window is warped (no full-size copies per face). ``acc_mask`` (HxW float32), if
    given, receives the max of the pasted masks.
    """
    cv2 = cv2_module()
    size = face.shape[0]
    inv = cv2.invertAffineTransform(m_out)
    corners = np.array([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1]], np.float32)
    roi = roi_of(apply(inv, corners), base.shape[:2], margin=2)
    if roi is None:
        return base
    x0, y0, x1, y1 = roi
    warped = warp_into_roi(face.astype(np.float32), inv, roi).clip(0, 255)
    wmask = warp_into_roi(mask_crop, inv, roi, flags=cv2.INTER_LINEAR).clip(0, 1)[..., None]
    window = base[y0:y1, x0:x1].astype(np.float32)
    base[y0:y1, x0:x1] = np.round(wmask * warped + (1 - wmask) * window).astype(np.uint8)
    if acc_mask is not None:
        acc_mask[y0:y1, x0:x1] = np.maximum(acc_mask[y0:y1, x0:x1], wmask[..., 0])
    return base


def blend_upscale(image: Any, general, face_model, scale: float = 4.0, face_analyzer=None, *,
                  faces: list | None = None, crop_size: int = CROP_SIZE, feather: float = 24.0,
                  margin: float = 16.0, min_face: float = 8.0, tile_size: int | None = None,
                  color_fix: str = "adain", seed: int = 0, prompt_embeds=None, plan=None,
                  progress: Callable[[int, int], Any] | None = None, return_info: bool = False):
    """Upscale ``image`` with ``general`` and paste ``face_model``'s aligned face crops back (see module doc).

    ``image`` is any kind the pipeline accepts (PIL, HxWxC uint8, BxHxWxC float tensor); the result is the same
    kind and exactly the size ``general.upscale`` gives. ``faces`` (LQ-coordinate ``DetectedFace`` lists, one per
    batch image, or one list for a single image) skips detection; otherwise ``face_analyzer.detect`` finds them.
    Faces whose eye distance in the LQ is under ``min_face`` px are left to the general model. ``plan``: the
    general model's plan for the whole image (``general.plan``, e.g. the one whose memory a host reserved), run
    with its own options instead of a new plan from ``scale``/``tile_size``/...
    """
    cv2 = cv2_module()
    if face_analyzer is None and faces is None:
        raise InputImageError("The blend baseline needs a face analyzer (or given faces) to find the faces.")
    batch = to_batch(image)
    lqs = tensor_to_uint8(batch.rgb)
    if faces is not None and (not faces or not isinstance(faces[0], (list, tuple))):
        faces = [faces]
    common = dict(tile_size=tile_size, color_fix=color_fix, seed=seed, prompt_embeds=prompt_embeds)
    outs, masks, infos = [], [], []
    for i, lq in enumerate(lqs):
        found = faces[i] if faces is not None else face_analyzer.detect(lq)
        found = [f for f in found if np.linalg.norm(np.asarray(f.kps[1]) - np.asarray(f.kps[0])) >= min_face]
        whole = dict(plan=plan, options=plan.options) if plan is not None else dict(scale=scale, **common)
        out = np.array(general.upscale(lq, progress=progress, **whole), copy=True)
        acc = np.zeros(out.shape[:2], np.float32)
        mask_crop = _feather_mask(crop_size, margin, feather)
        placed = []
        for j, f in enumerate(found):
            m_out, lq_crop = face_crop_transform(f.kps, out.shape[1] / lq.shape[1], crop_size)
            m_lq = _lq_matrix(m_out, out.shape[1] / lq.shape[1], lq_crop, crop_size)
            crop = cv2.warpAffine(lq, m_lq, (lq_crop, lq_crop), flags=cv2.INTER_CUBIC,
                                  borderMode=cv2.BORDER_REFLECT_101)
            restored = np.asarray(face_model.upscale(crop, scale=crop_size / lq_crop, progress=progress, **common))
            if restored.shape[:2] != (crop_size, crop_size):  # rounding of crop_size / lq_crop
                restored = cv2.resize(restored, (crop_size, crop_size), interpolation=cv2.INTER_CUBIC)
            paste_face(out, restored, m_out, mask_crop, acc)
            placed.append({"face_index": j, "box": [float(v) for v in np.asarray(f.bbox) * (out.shape[1] / lq.shape[1])],
                           "lq_crop": lq_crop})
        outs.append(torch.from_numpy(out).permute(2, 0, 1)[None].float() / 255.0)
        masks.append(torch.from_numpy(acc)[None, None])
        infos.append(placed)
    result = from_batch(torch.cat(outs), None, batch)
    if not return_info:
        return result
    return result, {"face_mask": torch.cat(masks), "faces": infos}
