"""Reference encoding: one or several photos of one person -> one aligned crop + one identity embedding."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..errors import FaceError, HeadsUpError, InputImageError
from .align import CROP_SIZE, align_face, cv2_module
from .common import normalise
from .identity import to_common
from .types import DetectedFace, Reference

log = logging.getLogger(__name__)


def _as_rgb(image, name: str) -> np.ndarray:
    """Any accepted image kind (path, PIL, uint8 array, float tensor) -> HxWx3 uint8 RGB."""
    from ..imageio import to_uint8_rgb
    from ..files.read import load_image

    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    try:
        return np.ascontiguousarray(to_uint8_rgb(image))
    except HeadsUpError as err:
        raise InputImageError(f"Reference {name}: {err}") from None


def _name(image, index: int) -> str:
    return f"{Path(image).name} (image {index})" if isinstance(image, (str, os.PathLike)) else f"image {index}"


def sharpness(crop: np.ndarray) -> float:
    """Variance of the Laplacian of the grey crop: higher is sharper."""
    cv2 = cv2_module()
    grey = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def _pick_face(faces: list[DetectedFace], mean_identity: np.ndarray | None) -> DetectedFace:
    """The face matching the running identity best, or the largest one when there is no identity yet."""
    if mean_identity is not None and all(f.embedding is not None for f in faces) and len(faces) > 1:
        return max(faces, key=lambda f: float(f.embedding @ mean_identity))
    return max(faces, key=lambda f: f.area)


def encode_reference(images, analyzer, min_similarity: float | None = None) -> Reference:
    """Encode one or several photos of ONE person into a ``Reference``.

    ``images``: one image or a list (file paths, PIL images, HxWx3 uint8 arrays or ComfyUI IMAGE tensors; a
    BxHxWxC tensor counts as B photos). The largest face of the first photo starts the identity; in later
    photos the face most similar to the running mean identity is taken. Embeddings are averaged and
    renormalised; the crop with the best frontal x sharpness score is kept. ``min_similarity``: if given, a
    photo whose best face is less similar than this to the identity so far raises ``FaceError``.
    """
    items = _expand(images)
    if not items:
        raise FaceError("No reference image was given; pass at least one photo of the person.")
    embeddings: list[np.ndarray] = []
    best: Reference | None = None
    mean = None
    for index, (image, name) in enumerate(items):
        rgb = _as_rgb(image, name)
        faces = analyzer.detect(rgb)
        if not faces:
            raise FaceError(f"No face found in reference {name}; use a photo where the face is clearly visible "
                            "(frontal, not too small).")
        face = _pick_face(faces, mean)
        if mean is not None and face.embedding is not None:
            sim = to_common(float(face.embedding @ mean), getattr(analyzer, "identity_kind", "arcface"))
            if min_similarity is not None and sim < min_similarity:
                raise FaceError(f"Reference {name} does not look like the same person as the earlier photos "
                                f"(similarity {sim:.2f} < {min_similarity}); give photos of one person only.")
            if sim < 0.2:
                log.warning("reference %s: best face has low similarity %.2f to the other photos", name, sim)
        if face.embedding is not None:
            embeddings.append(face.embedding)
            mean = normalise(np.mean(embeddings, axis=0))
        try:
            crop, crop_kps, frontal = align_face(rgb, face.kps, CROP_SIZE)
        except ValueError as err:
            raise FaceError(f"Cannot align the face in reference {name}: {err}.") from None
        cand = Reference(crop=crop, kps=crop_kps, embedding=None, sharpness=sharpness(crop), frontal=frontal,
                         source=name)
        if best is None or cand.score > best.score:
            best = cand
    best.embedding = mean
    best.num_images = len(items)
    return best


def _expand(images) -> list[tuple[object, str]]:
    """Flatten the accepted inputs into (single image, display name) pairs."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        torch = None
    if torch is not None and isinstance(images, torch.Tensor) and images.ndim == 4:
        return [(images[i:i + 1], f"image {i}") for i in range(images.shape[0])]
    if isinstance(images, Reference):
        raise FaceError("encode_reference got an already encoded Reference; pass it to the pipeline directly.")
    if isinstance(images, (list, tuple)):
        out = []
        for i, img in enumerate(images):
            if torch is not None and isinstance(img, torch.Tensor) and img.ndim == 4 and img.shape[0] > 1:
                out += [(img[j:j + 1], f"image {i}.{j}") for j in range(img.shape[0])]
            else:
                out.append((img, _name(img, i)))
        return out
    return [(images, _name(images, 0))]


def as_references(reference, analyzer=None) -> list[Reference]:
    """The one reference normaliser (pipeline, CLI, nodes): None, a Reference, a photo (path, PIL, HxWx3 uint8,
    a 1xHxWxC tensor), or a list of these -> a list of References. Each photo is one person (a group portrait
    gets one reference per person; a BxHxWxC tensor counts as B people); to merge several photos of one person,
    call ``encode_reference([photo1, photo2], analyzer)`` and pass the result."""
    if reference is None:
        return []
    items = [r for r, _ in _expand(reference)] if not isinstance(reference, Reference) else [reference]
    if all(isinstance(r, Reference) for r in items):
        return items
    if analyzer is None:
        raise FaceError("Reference photos need a face analyzer to find and align the face; pass face_analyzer= "
                        "(load_face_analyzer, e.g. faces='auto') or give no reference.")
    return [r if isinstance(r, Reference) else encode_reference([r], analyzer) for r in items]
