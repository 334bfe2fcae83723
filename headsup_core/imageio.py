"""Conversions between the image kinds the pipeline accepts and one internal batch layout.

Accepted kinds (DESIGN §4): a PIL image, an HxWxC uint8 numpy array (uint16 is accepted too), or a BxHxWxC
float tensor in 0..1 (ComfyUI's IMAGE). Internally every image is an RGB float32 tensor Bx3xHxW in 0..1 plus an
optional alpha plane Bx1xHxW, which is resized alongside the colour and re-attached on the way out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import InputImageError

MAX_SIDE = 65536  # a sanity cap: larger sides are almost certainly corrupt headers


@dataclass
class ImageBatch:
    rgb: torch.Tensor  # Bx3xHxW float32, 0..1
    alpha: torch.Tensor | None  # Bx1xHxW float32, 0..1
    kind: str  # "pil" | "numpy" | "tensor"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.rgb.shape[-2]), int(self.rgb.shape[-1])


def _check_size(h: int, w: int) -> None:
    if h < 1 or w < 1:
        raise InputImageError(f"The image is empty ({w}x{h} pixels); give an image at least 1x1 pixel.")
    if h > MAX_SIDE or w > MAX_SIDE:
        raise InputImageError(f"The image is {w}x{h} pixels; sides above {MAX_SIDE} are not supported.")


def _from_array(arr: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """HxW or HxWxC array (uint8, uint16, bool or float 0..1) -> (1x3xHxW, 1x1xHxW | None, meta)."""
    meta: dict[str, Any] = {"dtype": str(arr.dtype), "ndim": arr.ndim}
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise InputImageError(f"Expected an HxW or HxWxC image array, got shape {tuple(arr.shape)}.")
    _check_size(arr.shape[0], arr.shape[1])
    if arr.dtype == np.uint8:
        x = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        x = arr.astype(np.float32) / 65535.0
    elif arr.dtype == bool:
        x = arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.floating):
        x = arr.astype(np.float32)
        if not np.isfinite(x).all():
            raise InputImageError("The image contains NaN or infinite values.")
        x = np.clip(x, 0.0, 1.0)
    else:
        raise InputImageError(f"Unsupported image array dtype {arr.dtype}; use uint8, uint16 or float in 0..1.")
    channels = x.shape[2]
    if channels not in (1, 2, 3, 4):
        raise InputImageError(f"Unsupported number of channels: {channels}; use 1 (grey), 2, 3 (RGB) or 4 (RGBA).")
    meta["channels"] = channels
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None]
    alpha = None
    if channels in (2, 4):
        alpha = t[:, -1:].clone()
        t = t[:, :-1]
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    return t.contiguous(), alpha, meta


def _pil_to_array(image) -> tuple[np.ndarray, dict]:
    mode = image.mode
    meta = {"mode": mode}
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.int64)
        arr = np.clip(arr, 0, 65535).astype(np.uint16)
    elif mode == "F":
        arr = np.asarray(image, dtype=np.float32)
    elif mode in ("RGB", "RGBA", "L", "LA"):
        arr = np.asarray(image)
    elif mode == "P" and "transparency" in image.info:
        arr = np.asarray(image.convert("RGBA"))
    elif mode in ("P", "CMYK", "YCbCr", "LAB", "HSV", "1"):
        arr = np.asarray(image.convert("RGB"))
    elif mode == "PA":
        arr = np.asarray(image.convert("RGBA"))
    else:
        raise InputImageError(f"Unsupported PIL image mode {mode!r}; convert the image to RGB first.")
    return arr, meta


def to_batch(image: Any) -> ImageBatch:
    """Convert any accepted image kind to an ImageBatch."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a hard dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        arr, meta = _pil_to_array(image)
        meta["info"] = {k: image.info[k] for k in ("icc_profile", "exif", "xmp") if image.info.get(k)}
        rgb, alpha, m2 = _from_array(arr)
        meta.update(m2)
        return ImageBatch(rgb, alpha, "pil", meta)
    if isinstance(image, np.ndarray):
        rgb, alpha, meta = _from_array(image)
        return ImageBatch(rgb, alpha, "numpy", meta)
    if isinstance(image, torch.Tensor):
        t = image
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4:
            raise InputImageError(f"Expected a BxHxWxC image tensor, got shape {tuple(image.shape)}.")
        if t.shape[0] == 0:
            raise InputImageError("The image batch is empty.")
        _check_size(int(t.shape[1]), int(t.shape[2]))
        if not t.is_floating_point():
            raise InputImageError(f"Expected a float image tensor in 0..1, got dtype {t.dtype}.")
        channels = int(t.shape[-1])
        if channels not in (1, 3, 4):
            raise InputImageError(f"Expected 1, 3 or 4 channels in the last dimension, got shape {tuple(t.shape)}.")
        t = t.detach().float()
        if not torch.isfinite(t).all():
            raise InputImageError("The image contains NaN or infinite values.")
        t = t.clamp(0, 1).permute(0, 3, 1, 2)
        alpha = t[:, 3:4].contiguous() if channels == 4 else None
        rgb = t[:, :3] if channels >= 3 else t.expand(-1, 3, -1, -1)
        meta = {"channels": channels, "device": image.device, "dtype": image.dtype, "batched": image.ndim == 4}
        return ImageBatch(rgb.contiguous(), alpha, "tensor", meta)
    raise InputImageError(
        f"Unsupported image type {type(image).__name__}; pass a PIL image, an HxWxC uint8 numpy array or a "
        "BxHxWxC float tensor in 0..1."
    )


def from_batch(rgb: torch.Tensor, alpha: torch.Tensor | None, like: ImageBatch):
    """Convert Bx3xHxW (0..1) plus optional alpha back to the kind (and bit depth) of ``like``."""
    rgb = rgb.detach().float().clamp(0, 1).cpu()
    channels = like.meta.get("channels", 3)
    if like.kind == "tensor":
        out = rgb
        if channels == 1:
            out = rgb.mean(1, keepdim=True)
        if alpha is not None:
            out = torch.cat([out, alpha.detach().float().clamp(0, 1).cpu()], 1)
        out = out.permute(0, 2, 3, 1).contiguous()
        if not like.meta.get("batched", True):
            out = out[0]
        return out
    x = rgb[0].permute(1, 2, 0).numpy()
    if channels in (1, 2):
        x = x.mean(axis=2, keepdims=True)
    if alpha is not None:
        x = np.concatenate([x, alpha[0].detach().float().clamp(0, 1).cpu().permute(1, 2, 0).numpy()], axis=2)
    sixteen = like.meta.get("dtype") == "uint16"
    if like.kind == "numpy":
        if like.meta.get("dtype", "uint8").startswith("float"):
            arr = x.astype(np.float32)
        elif sixteen:
            arr = np.round(x * 65535.0).astype(np.uint16)
        else:
            arr = np.round(x * 255.0).astype(np.uint8)
        return arr[:, :, 0] if arr.shape[2] == 1 and like.meta.get("ndim") == 2 else arr
    return _carry_info(_to_pil(x, sixteen), like.meta.get("info", {}))


def _to_pil(x: np.ndarray, sixteen: bool):
    from PIL import Image

    if sixteen and x.shape[2] == 1:
        return Image.fromarray(np.round(x[:, :, 0] * 65535.0).astype(np.uint16))
    arr = np.round(x * 255.0).astype(np.uint8)
    if arr.shape[2] == 1:
        return Image.fromarray(arr[:, :, 0], "L")
    if arr.shape[2] == 2:
        return Image.fromarray(arr, "LA")
    return Image.fromarray(arr, "RGBA" if arr.shape[2] == 4 else "RGB")


def _carry_info(out, info: dict):
    """The input's ICC profile (sRGB for an untagged colour image), EXIF (Software set, pixel dimensions updated)
    and XMP on a PIL result, so library users keep them when they save."""
    from .files.meta import output_exif, srgb_icc

    icc = info.get("icc_profile")
    if icc is None and out.mode in ("RGB", "RGBA"):
        icc = srgb_icc()
    if icc:
        out.info["icc_profile"] = icc
    out.info["exif"] = output_exif(info.get("exif"), out.size, keep_gps=True)
    if info.get("xmp"):
        out.info["xmp"] = info["xmp"]
    return out


def to_uint8_rgb(image: Any) -> np.ndarray:
    """Any single accepted image -> HxWx3 uint8 RGB (for face detection and previews)."""
    batch = to_batch(image)
    return tensor_to_uint8(batch.rgb[:1])[0]


def tensor_to_uint8(rgb: torch.Tensor) -> list[np.ndarray]:
    """Bx3xHxW 0..1 -> list of HxWx3 uint8 arrays."""
    x = (rgb.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [np.ascontiguousarray(a) for a in x]
