"""Reading image files: Pillow's decompression-bomb guard as one sentence, then the decoded image."""
from __future__ import annotations

import logging
import os
import struct
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputImageError
from .deep import have_tifffile, png16_rawmode, read_png16, read_tiff16, tiff16_rgb
from .meta import (FileMeta, exif_orientation, icc_colour_space, icc_readable, meta_from_pil, srgb_icc,
                   transpose_array)

log = logging.getLogger("headsup")

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default (Image.MAX_IMAGE_PIXELS): 0.25 GiB of 24-bit pixels
MAX_PIXELS_ENV = "HEADSUP_MAX_PIXELS"
MAX_PIXELS_HINT = f"pass --max-pixels N (or set ${MAX_PIXELS_ENV}) to raise it if you trust the file"


def max_pixels_limit(max_pixels: int | None = None) -> int:
    """The pixel limit: the argument, else $HEADSUP_MAX_PIXELS, else Pillow's ``Image.MAX_IMAGE_PIXELS`` (89.5 MP
    unless a library user changed it; None there means no limit)."""
    if max_pixels is None:
        env = os.environ.get(MAX_PIXELS_ENV, "").strip()
        if env:
            try:
                max_pixels = int(float(env))
            except ValueError:
                raise InputImageError(f"${MAX_PIXELS_ENV}={env!r} is not a number of pixels; "
                                      "give a whole number above 0.") from None
        else:
            from PIL import Image

            max_pixels = Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS is not None else 2**62
    if max_pixels < 1:
        raise InputImageError(f"The pixel limit must be a whole number above 0, got {max_pixels}.")
    return int(max_pixels)


def _claimed_size(path: str) -> tuple[int, int] | None:
    """The size a file's header claims, read with the guard lifted for the header only (nothing is decoded)."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None
        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001 - only used to word the refusal
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _too_big(path: str, limit: int) -> InputImageError:
    size = _claimed_size(path)
    claimed = f"{size[0]}x{size[1]} pixels ({size[0] * size[1] / 1e6:.1f} megapixels)" if size else "more pixels"
    return InputImageError(f"Cannot read image {path}: its header claims {claimed}, above the limit of "
                           f"{limit} pixels ({limit / 1e6:.1f} megapixels); {MAX_PIXELS_HINT}.")


def open_checked(path: str, max_pixels: int | None = None):
    """``Image.open`` with Pillow's decompression-bomb guard set to the limit; anything above it is refused.

    Pillow warns between 1x and 2x its limit and refuses above 2x; here both are one refusal, so the same file is
    either read or refused, whatever the warning filters are."""
    from PIL import Image

    limit = max_pixels_limit(max_pixels)
    saved = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = limit
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
        if any("EXIF" in str(w.message) for w in caught):  # Pillow's own is a 2-line UserWarning
            log.warning("headsup: %s: part of its EXIF block is corrupt; what could be read is kept.", path)
        return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_big(path, limit) from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


@dataclass
class Photo:
    """A decoded input file: upright pixels (a PIL image, or an HxWxC uint16 array for 16-bit colour) + metadata."""

    pixels: Any
    meta: FileMeta
    path: str = ""

    @property
    def size(self) -> tuple[int, int]:
        if isinstance(self.pixels, np.ndarray):
            return int(self.pixels.shape[1]), int(self.pixels.shape[0])
        return self.pixels.size


# Pillow's Image.Transpose for each EXIF orientation (the table of ImageOps.exif_transpose).
_TRANSPOSE = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
              7: "TRANSVERSE", 8: "ROTATE_90"}


def _upright(image, orientation: int):
    from PIL import Image

    if orientation not in _TRANSPOSE:
        return image
    info = dict(image.info)
    out = image.transpose(getattr(Image.Transpose, _TRANSPOSE[orientation]))
    out.info.update(info)
    return out


def _fit_profile(image, meta: FileMeta, path: str):
    """Keep the ICC profile only where it describes the pixels; CMYK is converted to sRGB through its profile."""
    space = icc_colour_space(meta.icc_profile)
    if image.mode == "CMYK":
        converted = None
        if space == "CMYK":
            try:
                import io

                from PIL import ImageCms

                src = ImageCms.ImageCmsProfile(io.BytesIO(meta.icc_profile))
                converted = ImageCms.profileToProfile(image, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
            except Exception as err:  # noqa: BLE001 - fall back to Pillow's naive conversion, and say so
                log.warning("headsup: the CMYK profile could not be applied (%s); converting naively.", err)
        meta.icc_profile = srgb_icc()
        meta.notes.append("CMYK converted to sRGB")
        return converted if converted is not None else image.convert("RGB")
    if space is not None and not icc_readable(meta.icc_profile):
        log.warning("headsup: %s: its ICC profile is damaged and is not carried over.", path)
        meta.icc_profile, space = None, None
    family = "GRAY" if image.mode in ("L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "1") else "RGB"
    if space is not None and space != family:
        log.warning("headsup: %s: its %s ICC profile does not match its %s pixels and is not carried over.",
                    path, space, family)
        meta.icc_profile = None
    return image


def read_photo(path: str | os.PathLike, max_pixels: int | None = None) -> Photo:
    """Read an image file for upscaling: size-checked, first frame, EXIF orientation applied, metadata kept."""
    from PIL import UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputImageError(f"Image file not found: {path}")
    if os.path.isdir(path):
        raise InputImageError(f"Expected an image file but got a folder: {path}")
    try:
        with open_checked(path, max_pixels) as im:
            deep = "png" if png16_rawmode(im) else "tiff" if tiff16_rgb(im) else None  # before anything loads
            frames = int(getattr(im, "n_frames", 1) or 1)
            orientation = exif_orientation(im)
            meta = meta_from_pil(im, transposed=orientation != 1)
            if frames > 1:
                note = f"{path} has {frames} frames; only the first is upscaled"
                log.warning("headsup: %s.", note)
                meta.notes.append(note)
            if deep == "png":
                pixels = read_png16(lambda: open_checked(path, max_pixels))
            elif deep == "tiff" and have_tifffile():
                pixels = read_tiff16(path)
            else:
                if deep == "tiff":
                    log.warning("headsup: %s is a 16-bit TIFF, read as 8-bit: pip install tifffile to keep 16 bits.",
                                path)
                im.load()
                pixels = im.copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error) as err:
        if isinstance(err, InputImageError):
            raise
        raise InputImageError(f"Cannot read image {path}: {err}. Use a PNG, JPEG, WebP or TIFF file.") from None
    if isinstance(pixels, np.ndarray):
        meta.bits = 16
        pixels = transpose_array(pixels, orientation)
    else:
        if pixels.mode in ("I;16", "I;16B", "I;16L", "I"):
            meta.bits = 16
        pixels = with_meta(_fit_profile(_upright(pixels, orientation), meta, path), meta)
    return Photo(pixels, meta, path)


def with_meta(image, meta: FileMeta):
    """``image`` with ``info`` icc_profile / exif / xmp set from ``meta`` (what a library user keeps)."""
    for key, value in (("icc_profile", meta.icc_profile), ("exif", meta.exif), ("xmp", meta.xmp)):
        if value:
            image.info[key] = value
        else:
            image.info.pop(key, None)
    return image


def load_image(path: str | os.PathLike, max_pixels: int | None = None):
    """Open an image file fully (so errors surface here, not later) and return an upright PIL image.

    Images above ``max_pixels`` (default: $HEADSUP_MAX_PIXELS, else Pillow's 89.5 megapixels) are refused; EXIF
    orientation is applied (and reset to 1 in ``info["exif"]``); ICC profile, EXIF and XMP stay in ``info``;
    an animated file gives its first frame. 16-bit colour comes back as 8-bit RGB here (``read_photo`` keeps 16).
    """
    from PIL import Image

    photo = read_photo(path, max_pixels)
    image = photo.pixels
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.round(image.astype(np.float32) / 257.0).astype(np.uint8))
    return with_meta(image, photo.meta)
