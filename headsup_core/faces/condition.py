"""Face-aware conditioning: match references to faces, warp them onto a canvas, and build the face mask.

Everything is rendered per face inside that face's bounding window only (``align.warp_into_roi``), so a 4K/8K
output costs the full-size canvas and mask tensors plus a few face-sized buffers, never a full-size float copy
per face.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from ..errors import FaceError
from .align import FACE_ELLIPSE_512, apply, cv2_module, estimate_similarity, roi_of, scale_of, template, warp_into_roi
from .common import check_image
from .identity import MATCH_THRESHOLD, to_common
from .types import DetectedFace, FaceCondition, Reference

log = logging.getLogger(__name__)

MASK_MARGIN = 0.10  # the face region is grown by this fraction of the face size, then feathered by half of it
STRIP_ROWS = 256


def match_references(face_embeddings, ref_embeddings, threshold: float | None = None,
                     face_areas=None, identity_kind: str = "arcface") -> list[tuple[int | None, float | None]]:
    """One-to-one greedy matching by identity similarity; returns (reference index, similarity) per face.

    Similarities and ``threshold`` are on the common scale of ``faces.identity`` (default
    ``MATCH_THRESHOLD`` = 0.3), whichever identity model (``identity_kind``) made the embeddings.

    Pairs are taken in order of decreasing similarity, so every reference goes to the face it matches best
    unless a better-matching reference already took that face; pairs below ``threshold`` are never made.
    If identity is unavailable (any embedding is None) a single reference goes to the largest face (by
    ``face_areas``, else the first) with similarity None; several references then raise ``FaceError``.
    """
    n_faces, n_refs = len(face_embeddings), len(ref_embeddings)
    out: list[tuple[int | None, float | None]] = [(None, None)] * n_faces
    if n_faces == 0 or n_refs == 0:
        return out
    if any(e is None for e in face_embeddings) or any(e is None for e in ref_embeddings):
        if n_refs > 1:
            raise FaceError("Several references need identity embeddings to be matched to faces, but the face "
                            "analyzer has no recognizer; load one with a recognizer (insightface pack) or give one "
                            "reference.")
        log.warning("no identity embeddings: the reference goes to the largest face without an identity check")
        largest = int(np.argmax(face_areas)) if face_areas is not None else 0
        out[largest] = (0, None)
        return out
    threshold = MATCH_THRESHOLD if threshold is None else float(threshold)
    faces = np.stack([np.asarray(e, np.float32) for e in face_embeddings])
    refs = np.stack([np.asarray(e, np.float32) for e in ref_embeddings])
    if faces.shape[1] != refs.shape[1]:
        raise FaceError(f"The references' identity embeddings ({refs.shape[1]}-d) come from another face model than "
                        f"the faces' ({faces.shape[1]}-d); encode the references with the same face analyzer.")
    sims = to_common(faces @ refs.T, identity_kind)
    used_faces, used_refs = set(), set()
    for flat in np.argsort(-sims, axis=None, kind="stable"):
        f, r = divmod(int(flat), n_refs)
        if sims[f, r] < threshold:
            break
        if f in used_faces or r in used_refs:
            continue
        out[f] = (r, float(sims[f, r]))
        used_faces.add(f)
        used_refs.add(r)
    return out


def _face_region(template_mask: np.ndarray | None, m_tpl: np.ndarray, face: DetectedFace, out_hw, size: float):
    """Soft mask of one face: (window, low-resolution float32 mask, its 2x3 map to image pixels), or None when
    the face is off-image."""
    cv2 = cv2_module()
    margin = MASK_MARGIN * size
    sigma = margin / 2.0
    (cx, cy), (ax, ay) = FACE_ELLIPSE_512
    ellipse = apply(m_tpl, np.array([[cx - ax, cy - ay], [cx + ax, cy - ay], [cx - ax, cy + ay], [cx + ax, cy + ay]]))
    x1, y1, x2, y2 = (float(v) for v in face.bbox)
    box = np.array([[x1, y1], [x2, y2]], np.float32)
    roi = roi_of(np.concatenate([ellipse, box]), out_hw, margin=margin + 3.0 * sigma + 2.0)
    if roi is None:
        return None
    rx0, ry0, rx1, ry1 = roi
    region = np.zeros((ry1 - ry0, rx1 - rx0), np.uint8)
    if template_mask is not None:  # parsing mask in template space, grown by the margin
        grown = cv2.dilate((template_mask > 0.5).astype(np.uint8) * 255,
                           cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * int(margin / scale_of(m_tpl)) + 1,) * 2))
        region = warp_into_roi(grown, m_tpl, roi, flags=cv2.INTER_LINEAR)
    else:  # the template face ellipse, mapped through the landmarks' similarity, grown by the margin
        s = scale_of(m_tpl)
        angle = float(np.degrees(np.arctan2(m_tpl[1, 0], m_tpl[0, 0])))
        centre = apply(m_tpl, np.array([[cx, cy]]))[0] - (rx0, ry0)
        axes = (int(round(ax * s + margin)), int(round(ay * s + margin)))
        cv2.ellipse(region, (int(round(centre[0])), int(round(centre[1]))), axes, angle, 0, 360, 255, -1)
    # The detector's box is always inside the mask, so faces are covered even when landmarks are off.
    bx0, by0 = int(np.floor(x1 - margin)) - rx0, int(np.floor(y1 - margin)) - ry0
    bx1, by1 = int(np.ceil(x2 + margin)) - rx0, int(np.ceil(y2 + margin)) - ry0
    cv2.rectangle(region, (bx0, by0), (bx1, by1), 255, -1)
    # Feather at a reduced resolution (block mean by k, blur with sigma / k): a blur with sigma in the hundreds
    # of pixels at 8K would cost minutes; the feathered mask is smooth, so upsampling it loses nothing.
    k = max(1, int(sigma // 3))
    h, w = region.shape
    hl, wl = -(-h // k), -(-w // k)
    padded = np.zeros((hl * k, wl * k), np.float32)
    padded[:h, :w] = region
    low = padded.reshape(hl, k, wl, k).mean(axis=(1, 3)) / 255.0
    low = cv2.GaussianBlur(low, (0, 0), sigmaX=max(sigma / k, 0.5))
    np.clip(low, 0.0, 1.0, out=low)
    to_image = np.array([[k, 0, 0.5 * k - 0.5 + rx0], [0, k, 0.5 * k - 0.5 + ry0]], np.float64)
    return roi, low, to_image


def _strips(roi, rows: int = STRIP_ROWS):
    """Split a window into horizontal strips, so per-face float buffers stay small at any output size."""
    x0, y0, x1, y1 = roi
    for ys in range(y0, y1, rows):
        yield x0, ys, x1, min(ys + rows, y1)


def _sorted_faces(faces: list[DetectedFace]) -> list[DetectedFace]:
    """Stable left-to-right, top-to-bottom order, so face indices in reports are easy to read."""
    return sorted(faces, key=lambda f: (round(float(f.bbox[0])), round(float(f.bbox[1]))))


def build_face_condition(lq_rgb: np.ndarray, out_size, analyzer, references=None,
                         match_threshold: float | None = None, mask_without_reference: bool = True, face_indices=None, faces=None) -> FaceCondition:
    """Detect faces in the low-quality input and build the reference canvas and face mask at ``out_size``.

    ``lq_rgb``: HxWx3 uint8 RGB, the input before upscaling. ``out_size``: (H_out, W_out). ``references``: None,
    a ``Reference`` or a list of them. ``face_indices``: process only these faces (indices in the left-to-right
    order reported in ``assignments``); the others get neither mask nor reference. ``faces``: already detected
    faces in LQ coordinates (skips detection). Faces with a reference are always masked; faces without one
    only if ``mask_without_reference``.
    """
    cv2 = cv2_module()
    lq = check_image(lq_rgb)
    h_out, w_out = int(out_size[0]), int(out_size[1])
    h_in, w_in = lq.shape[:2]
    refs: list[Reference] = [] if references is None else (
        [references] if isinstance(references, Reference) else list(references))
    for i, r in enumerate(refs):
        if not isinstance(r, Reference):
            raise FaceError(f"Reference {i} is a {type(r).__name__}, not an encoded Reference; encode photos with "
                            "encode_reference() first.")
    if faces is None:
        faces = analyzer.detect(lq) if analyzer is not None else []
    faces = _sorted_faces(faces)
    selected = set(range(len(faces))) if face_indices is None else {int(i) for i in face_indices}
    chosen = [i for i in range(len(faces)) if i in selected]
    matches = match_references([faces[i].embedding for i in chosen], [r.embedding for r in refs], match_threshold,
                               face_areas=[faces[i].area for i in chosen],
                               identity_kind=getattr(analyzer, "identity_kind", "arcface"))
    per_face = {i: m for i, m in zip(chosen, matches)}
    if refs and not faces:
        log.warning("references were given but no face was found in the input; running without them")

    canvas = torch.zeros(1, 3, h_out, w_out, dtype=torch.float32)
    mask = torch.zeros(1, 1, h_out, w_out, dtype=torch.float32)
    sx, sy = w_out / w_in, h_out / h_in
    tpl = template()
    assignments = []
    for i, face_lq in enumerate(faces):
        face = face_lq.scaled(sx, sy)
        ref_idx, sim = per_face.get(i, (None, None))
        assignments.append({"face_index": i, "box": [round(float(v), 2) for v in face.bbox],
                            "reference_index": ref_idx, "similarity": None if sim is None else round(sim, 4),
                            "selected": i in selected})
        if i not in selected or (ref_idx is None and not mask_without_reference):
            continue
        try:
            m_tpl = estimate_similarity(tpl, face.kps)  # template (= crop) space -> output image
        except ValueError:
            log.warning("face %d has degenerate landmarks; skipped", i)
            continue
        size = max(scale_of(m_tpl) * 512.0 * 0.5, 1.0)  # about the face's extent in output pixels
        tpl_mask = None
        if getattr(analyzer, "parser", None) is not None:  # only a backend with a face parser has a parse_mask
            from .align import align_face

            crop, _, _ = align_face(lq, face_lq.kps)
            tpl_mask = analyzer.parse_mask(crop)
        region = _face_region(tpl_mask, m_tpl, face, (h_out, w_out), size)
        if region is not None:
            roi, low, to_image = region
            for strip in _strips(roi):
                part = warp_into_roi(low, to_image, strip, flags=cv2.INTER_LINEAR)
                view = mask[0, 0, strip[1]:strip[3], strip[0]:strip[2]]
                torch.maximum(view, torch.from_numpy(part), out=view)
        if ref_idx is not None:
            _place_reference(canvas, refs[ref_idx], face, (h_out, w_out), cv2)
            centre = apply(m_tpl, np.array([[256.0, 256.0]]))[0]
            assignments[-1]["ref_window"] = reference_window(centre, REF_WINDOW_FACES * size, (h_out, w_out))
    return FaceCondition(canvas=canvas, mask=mask, assignments=assignments,
                         has_reference=any(a["reference_index"] is not None for a in assignments))


REF_WINDOW_FACES = 2.0  # a reference is VAE-encoded in a window this many face sizes wide (the placed crop)
REF_WINDOW_ALIGN = 8  # windows sit on the VAE's latent grid


def reference_window(centre, side: float, out_hw, align: int = REF_WINDOW_ALIGN) -> list[int]:
    """Square window (x0, y0, x1, y1) of ``side`` px around ``centre`` on the ``align`` grid, shifted inside the
    image (rounded up to the grid) where it fits. Its size depends on the face only, not on the image."""
    h, w = -(-int(out_hw[0]) // align) * align, -(-int(out_hw[1]) // align) * align
    n = max(4, int(np.ceil(side / align)))  # at least 4 latents, so GroupNorm has something to normalise
    out = []
    for c, extent in ((centre[0], w), (centre[1], h)):
        k = min(n, extent // align)
        start = int(round(c / align - k / 2))
        start = min(max(start, 0), extent // align - k)
        out.append((start * align, (start + k) * align))
    (x0, x1), (y0, y1) = out
    return [x0, y0, x1, y1]


def encode_reference_windows(canvas, windows, encode, latent_hw, align: int = REF_WINDOW_ALIGN):
    """Reference latent (1x4xhxw) from a canvas by encoding each reference's window **on its own**.

    Encoding the whole canvas would let the VAE's GroupNorm statistics depend on how much of it is empty (a
    crop in training, a mostly empty full-size canvas at inference); a face-sized window gives the same latent
    for the same face wherever it is and whatever the image size. ``encode(x) -> latent`` takes a 1x3xHxW slice
    in [-1, 1] (pass a tiled encoder for huge faces). Windows past the canvas edge are zero-padded; overlapping
    windows are averaged. Training (``train.trainer``) and inference (``pipeline``) both use this."""
    h, w = int(latent_hw[0]), int(latent_hw[1])
    out, weight = None, torch.zeros(1, 1, h, w, device=canvas.device)
    for x0, y0, x1, y1 in windows:
        x0, y0, x1, y1 = (int(v) for v in (x0, y0, x1, y1))
        part = canvas[..., y0:min(y1, canvas.shape[-2]), x0:min(x1, canvas.shape[-1])]
        pad = (0, (x1 - x0) - part.shape[-1], 0, (y1 - y0) - part.shape[-2])
        if any(pad):
            part = torch.nn.functional.pad(part, pad)
        lat = encode(part)
        if out is None:
            out = torch.zeros(1, lat.shape[1], h, w, device=lat.device, dtype=lat.dtype)
            weight = weight.to(lat.device, lat.dtype)
        ly0, lx0 = y0 // align, x0 // align
        ly1, lx1 = min(ly0 + lat.shape[-2], h), min(lx0 + lat.shape[-1], w)
        out[..., ly0:ly1, lx0:lx1] += lat[..., :ly1 - ly0, :lx1 - lx0]
        weight[..., ly0:ly1, lx0:lx1] += 1
    if out is None:
        return None
    return out / weight.clamp_min(1)


def _place_reference(canvas, ref: Reference, face: DetectedFace, out_hw, cv2) -> None:
    """Warp the reference crop so that its landmarks land on the face's landmarks, inside the face window."""
    crop, kps = ref.crop, ref.kps
    m = estimate_similarity(kps, face.kps)  # crop -> output image
    if scale_of(m) < 0.75:  # shrink with area averaging first; warpAffine alone would alias the fine detail
        side = max(8, int(round(crop.shape[0] * scale_of(m))))
        kps = (kps + 0.5) * (side / crop.shape[0]) - 0.5
        crop = cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA)
        m = estimate_similarity(kps, face.kps)
    size = crop.shape[0]
    corners = apply(m, np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float32))
    roi = roi_of(corners, out_hw, margin=1.0)
    if roi is None:
        return
    ones = np.full(crop.shape[:2], 255, np.uint8)
    interp = cv2.INTER_CUBIC if scale_of(m) > 1.0 else cv2.INTER_LINEAR
    for x0, y0, x1, y1 in _strips(roi):
        warped = warp_into_roi(crop, m, (x0, y0, x1, y1), flags=interp)
        valid = torch.from_numpy(warp_into_roi(ones, m, (x0, y0, x1, y1), flags=cv2.INTER_NEAREST) > 0)
        patch = torch.from_numpy(warped).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        view = canvas[0, :, y0:y1, x0:x1]
        view.copy_(torch.where(valid[None], patch, view))


def format_assignments(assignments: list[dict]) -> str:
    """One line per face for logs, the CLI and node outputs: where each reference went."""
    lines = []
    for a in assignments:
        box = ", ".join(f"{v:.0f}" for v in a["box"])
        if a.get("selected", True) is False:
            what = "not selected"
        elif a["reference_index"] is None:
            what = "no reference"
        else:
            sim = "n/a (no identity model)" if a["similarity"] is None else f"{a['similarity']:.2f}"
            what = f"reference {a['reference_index']} (similarity {sim})"
        lines.append(f"face {a['face_index']} [{box}]: {what}")
    return "\n".join(lines) if lines else "no faces found"
