"""16-bit colour files, which Pillow (a 16-bit-per-channel RGB mode it lacks) reads as 8-bit and cannot write.

- PNG: Pillow's own decoder is run twice on the 16-bit stream, once keeping each sample's high byte (as Pillow does)
  and once its low byte (the same stream declared little-endian), so filtering, interlacing and zlib stay Pillow's.
  Writing is a small encoder here (Sub filter, zlib), with the same metadata chunks Pillow would write.
- TIFF: read and written with ``tifffile`` (``pip install tifffile``).
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

from ..errors import MissingDependencyError
from .meta import XMP_PNG_KEY, FileMeta, parse_exif, software_name

PNG16_RAWMODES = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}


def png16_rawmode(image) -> str | None:
    """The rawmode of a 16-bit RGB(A) PNG that Pillow would truncate to 8 bits, else None."""
    if image.format != "PNG" or len(image.tile) != 1:
        return None
    args = image.tile[0].args
    rawmode = args if isinstance(args, str) else (args[0] if args else None)
    return rawmode if rawmode in PNG16_RAWMODES else None


def read_png16(open_image) -> np.ndarray:
    """HxWx3|4 uint16 from a 16-bit PNG; ``open_image()`` opens a fresh PIL image of the file each call."""
    with open_image() as hi_im:
        hi_im.load()
        hi = np.asarray(hi_im).astype(np.uint16)
    with open_image() as lo_im:
        tile = lo_im.tile[0]
        lo_im.tile = [tile._replace(args=PNG16_RAWMODES[tile.args if isinstance(tile.args, str) else tile.args[0]])]
        lo_im.load()
        lo = np.asarray(lo_im).astype(np.uint16)
    return (hi << 8) | lo


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _text_chunk(key: str, value: str) -> bytes:
    try:
        return _chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        return _chunk(b"iTXt", key.encode("latin-1", "replace") + b"\0\0\0\0\0" + value.encode("utf-8"))


def png16_bytes(arr: np.ndarray, meta: FileMeta | None) -> bytes:
    """A 16-bit PNG of an HxW[xC] uint16 array (C = 1..4) with the output metadata ``meta`` (already prepared
    by ``write.output_meta``: EXIF final, XMP cleaned, Software in the text)."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    h, w, c = arr.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    rows = np.ascontiguousarray(arr.astype(">u2")).view(np.uint8).reshape(h, w * c * 2)
    bpp = 2 * c
    filtered = rows.copy()
    filtered[:, bpp:] = rows[:, bpp:] - rows[:, :-bpp]  # PNG filter 1 (Sub), modulo 256 by uint8 arithmetic
    raw = np.concatenate([np.ones((h, 1), np.uint8), filtered], axis=1).tobytes()
    out = [b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))]
    meta = meta or FileMeta()
    if meta.icc_profile:
        out.append(_chunk(b"iCCP", b"ICC profile\0\0" + zlib.compress(meta.icc_profile)))
    if meta.dpi:
        ppm = [max(1, round(d / 0.0254)) for d in meta.dpi]
        out.append(_chunk(b"pHYs", struct.pack(">IIB", ppm[0], ppm[1], 1)))
    if meta.exif:
        out.append(_chunk(b"eXIf", meta.exif[6:] if meta.exif.startswith(b"Exif\0\0") else meta.exif))
    out += [_text_chunk(k, v) for k, v in meta.text.items()]
    if meta.xmp:
        out.append(_chunk(b"iTXt", XMP_PNG_KEY.encode() + b"\0\0\0\0\0" + meta.xmp))
    out += [_chunk(b"IDAT", zlib.compress(raw, 6)), _chunk(b"IEND", b"")]
    return b"".join(out)


def have_tifffile() -> bool:
    import importlib.util

    return importlib.util.find_spec("tifffile") is not None


def _tifffile():
    try:
        import tifffile
    except ImportError:
        raise MissingDependencyError("16-bit colour TIFF files need the tifffile package: pip install tifffile "
                                     "(or save as 16-bit .png).") from None
    return tifffile


def tiff16_rgb(image) -> bool:
    """True for a TIFF with 16-bit colour samples (which Pillow would truncate to 8 bits)."""
    if image.format != "TIFF" or image.mode not in ("RGB", "RGBA"):
        return False
    bits = getattr(image, "tag_v2", {}).get(258)
    bits = bits if isinstance(bits, tuple) else (bits,)
    return all(b == 16 for b in bits if b is not None) and bits[0] == 16


def read_tiff16(path: str) -> np.ndarray:
    """The first page of a 16-bit colour TIFF as HxWxC uint16."""
    tifffile = _tifffile()
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        arr = page.asarray()
        axes = page.axes
    if axes.startswith("S") and arr.ndim == 3:
        arr = np.moveaxis(arr, 0, -1)
    return np.ascontiguousarray(arr.astype(np.uint16))


# IFD0 text tags a 16-bit TIFF carries over from the input's EXIF (the EXIF sub-IFD itself is not written).
_TIFF_TEXT_TAGS = (270, 271, 272, 306, 315, 33432)


def write_tiff16(arr: np.ndarray, path: str, meta: FileMeta | None) -> None:
    """A zlib-compressed 16-bit TIFF with ICC profile, XMP, Software and the input's IFD0 text tags."""

    tifffile = _tifffile()
    meta = meta or FileMeta()
    extratags = []
    if meta.icc_profile:
        extratags.append((34675, "B", len(meta.icc_profile), meta.icc_profile, True))
    if meta.xmp:
        extratags.append((700, "B", len(meta.xmp), meta.xmp, True))
    if meta.exif:
        exif = parse_exif(meta.exif)
        for tag in _TIFF_TEXT_TAGS:
            value = exif.get(tag)
            if isinstance(value, str) and value:
                extratags.append((tag, "s", 0, value, True))
    photometric = "rgb" if arr.ndim == 3 and arr.shape[2] >= 3 else "minisblack"
    extrasamples = ("unassalpha",) if arr.ndim == 3 and arr.shape[2] in (2, 4) else None
    resolution = (meta.dpi, "INCH") if meta.dpi else None
    tifffile.imwrite(path, arr.astype(np.uint16), photometric=photometric, compression="zlib",
                     extrasamples=extrasamples, extratags=extratags, software=software_name(), metadata=None,
                     resolution=resolution)
