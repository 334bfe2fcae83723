"""Writing outputs: the format follows the extension, the bit depth the input's, metadata carried, atomically.

Defaults follow photo tools' export settings: JPEG quality 95 with 4:4:4 chroma (no subsampling), WebP lossless,
PNG/TIFF at the input's bit depth (16-bit colour through ``deep``), the ICC profile embedded, EXIF/XMP/PNG text
copied with ``Software`` set, GPS dropped unless ``keep_gps``.
"""
from __future__ import annotations

import errno
import logging
import os
import tempfile
from dataclasses import replace

import numpy as np

from ..errors import OutputError
from .deep import have_tifffile, png16_bytes, write_tiff16
from .meta import XMP_PNG_KEY, FileMeta, clean_xmp, output_exif, parse_exif, software_name, srgb_icc

log = logging.getLogger("headsup")
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF",
           ".bmp": "BMP"}
DEFAULT_JPEG_QUALITY = 95


def output_format(path: str | os.PathLike) -> str:
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in FORMATS:
        raise OutputError(f"Cannot write {os.fspath(path)}: unknown image extension {ext or '(none)'!r}; "
                          f"use one of {', '.join(FORMATS)}.")
    return FORMATS[ext]


def output_meta(meta: FileMeta | None, size: tuple[int, int], *, keep_gps: bool = False) -> FileMeta:
    """The metadata an output of ``size`` (w, h) carries: EXIF final, XMP cleaned, Software in the PNG text."""
    meta = meta or FileMeta()
    text = {k: v for k, v in meta.text.items() if k != "Software"}
    text["Software"] = software_name()
    return replace(meta, exif=output_exif(meta.exif, size, keep_gps=keep_gps),
                   xmp=clean_xmp(meta.xmp, keep_gps=keep_gps), text=text, notes=[])


def _to_8bit(image):
    """16-bit grey or colour -> 8-bit, by value (Pillow's own I;16 -> L conversion clips instead)."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        return Image.fromarray(np.round(image.astype(np.float32) / 257.0).astype(np.uint8))
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.clip(np.asarray(image, dtype=np.float32) / 257.0, 0, 255)
        return Image.fromarray(np.round(arr).astype(np.uint8), "L")
    return image


def _pillow_kwargs(fmt: str, meta: FileMeta, jpeg_quality: int, webp_quality: int | None) -> dict:
    kwargs: dict = {}
    if meta.icc_profile and fmt != "BMP":
        kwargs["icc_profile"] = meta.icc_profile
    if meta.exif and fmt != "BMP":
        kwargs["exif"] = meta.exif
    if meta.dpi:
        kwargs["dpi"] = meta.dpi
    if fmt == "JPEG":
        kwargs.update(quality=jpeg_quality, subsampling=0)
    elif fmt == "WEBP":
        kwargs.update(lossless=True, quality=100, method=4) if webp_quality is None else kwargs.update(
            quality=webp_quality)
    elif fmt == "PNG":
        from PIL import PngImagePlugin

        info = PngImagePlugin.PngInfo()
        for key, value in meta.text.items():
            info.add_itxt(key, value) if not value.isascii() else info.add_text(key, value)
        if meta.xmp:
            info.add_itxt(XMP_PNG_KEY, meta.xmp.decode("utf-8", "replace"))
        kwargs["pnginfo"] = info
    elif fmt == "TIFF":  # IFD0 tags only: Pillow's compressed TIFF writer cannot write the EXIF/GPS sub-IFDs
        kwargs.pop("exif", None)
        kwargs.update(compression="tiff_deflate", tiffinfo=tiff_tags(meta))
    if meta.xmp and fmt in ("JPEG", "WEBP"):
        kwargs["xmp"] = meta.xmp
    return kwargs


def tiff_tags(meta: FileMeta) -> dict:
    """The output EXIF's IFD0 tags (camera, date, artist, copyright, ...), Software and XMP, as TIFF tags."""

    tags: dict = {}
    if meta.exif:
        exif = parse_exif(meta.exif)
        tags = {tag: value for tag, value in exif.items()
                if tag not in (0x8769, 0x8825, 0xA005) and isinstance(value, (str, int))}
    tags[305] = software_name()
    if meta.xmp:
        tags[700] = meta.xmp
    return tags


def _write(image, tmp: str, fmt: str, meta: FileMeta, jpeg_quality: int, webp_quality: int | None) -> None:
    if isinstance(image, np.ndarray) and fmt == "PNG":
        with open(tmp, "wb") as fh:
            fh.write(png16_bytes(image, meta))
        return
    if isinstance(image, np.ndarray) and fmt == "TIFF":
        if have_tifffile():
            write_tiff16(image, tmp, meta)
            return
        log.warning("headsup: writing an 8-bit TIFF: pip install tifffile to keep 16 bits (or save as .png).")
    if fmt not in ("PNG", "TIFF"):
        image = _to_8bit(image)
    elif isinstance(image, np.ndarray):
        image = _to_8bit(image)
    if fmt in ("JPEG", "BMP") and image.mode in ("RGBA", "LA", "P", "PA"):
        log.warning("headsup: %s has no alpha channel; the alpha of this image is dropped.", fmt)
        image = image.convert("RGB" if image.mode in ("RGBA", "P", "PA") else "L")
    image.save(tmp, format=fmt, **_pillow_kwargs(fmt, meta, jpeg_quality, webp_quality))


def save_photo(image, path: str | os.PathLike, meta: FileMeta | None = None, *, jpeg_quality: int | None = None,
               webp_quality: int | None = None, keep_gps: bool = False) -> None:
    """Write ``image`` (a PIL image, or an HxW[xC] uint16 array) to ``path`` in the format of its extension.

    The file appears whole or not at all: it is written to a temporary file beside ``path`` and renamed."""
    path = os.fspath(path)
    fmt = output_format(path)
    jpeg_quality = DEFAULT_JPEG_QUALITY if jpeg_quality is None else jpeg_quality
    size = (image.shape[1], image.shape[0]) if isinstance(image, np.ndarray) else image.size
    final = output_meta(meta, size, keep_gps=keep_gps)
    channels = (image.shape[2] if image.ndim == 3 else 1) if isinstance(image, np.ndarray) else len(image.getbands())
    if final.icc_profile is None and channels >= 3 and fmt != "BMP":
        final.icc_profile = srgb_icc()  # an untagged input is sRGB by convention; say so in the output
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".headsup-", suffix=os.path.splitext(path)[1].lower(), dir=folder)
    except OSError as err:
        raise _output_error(err, path) from None
    os.close(fd)
    try:
        _write(image, tmp, fmt, final, jpeg_quality, webp_quality)
        os.chmod(tmp, _new_file_mode(path))  # mkstemp makes 0600; the output gets what a plain open() would give
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, OSError) and not isinstance(err, OutputError):
            raise _output_error(err, path) from None
        raise


def _new_file_mode(path: str) -> int:
    """An existing output keeps its permissions; a new one gets 0666 less the umask, like any file a program makes."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _output_error(err: OSError, path: str) -> OutputError:
    if err.errno == errno.ENOSPC:
        full = OutputError(f"Cannot write {path}: no space left on {os.path.dirname(os.path.abspath(path))}.")
        full.no_space = True
        return full
    reason = err.strerror or str(err)
    return OutputError(f"Cannot write {path}: {reason}.")


def save_image_atomic(image, path: str | os.PathLike) -> None:
    """Write an image atomically, keeping the metadata in its ``info`` (the library's plain save)."""
    meta = FileMeta(icc_profile=image.info.get("icc_profile"), exif=image.info.get("exif"),
                    xmp=image.info.get("xmp")) if hasattr(image, "info") else None
    save_photo(image, path, meta)
