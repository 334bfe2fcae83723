"""Photo metadata carried from an input file to its output: ICC profile, EXIF, XMP and PNG text.

EXIF follows what photo tools (Pillow's ``ImageOps.exif_transpose``, ImageMagick's ``-auto-orient``, Lightroom
exports) settle on: the orientation is applied to the pixels and the tag reset to 1, the pixel dimensions are those
of the output, ``Software`` names HeadsUp, and GPS tags (EXIF and XMP) are dropped unless asked for.
"""
from __future__ import annotations

import functools
import logging
import re
import struct
import warnings
from dataclasses import dataclass, field

import numpy as np

from ..version import __version__

ORIENTATION, SOFTWARE, EXIF_IFD, GPS_IFD = 0x0112, 0x0131, 0x8769, 0x8825
PIXEL_X, PIXEL_Y = 0xA002, 0xA003
# TIFF tags that describe a file's own pixel layout (Pillow's getexif on a TIFF returns them with the camera tags),
# and ICC/XMP, which travel separately: none of them belongs in an output's EXIF.
STRUCTURE_TAGS = (254, 255, 256, 257, 258, 259, 262, 263, 266, 273, 277, 278, 279, 280, 281, 282, 283, 284, 296,
                  317, 320, 322, 323, 324, 325, 338, 339, 340, 341, 530, 531, 532, 700, 34675)
XMP_PNG_KEY = "XML:com.adobe.xmp"
log = logging.getLogger("headsup")


def software_name() -> str:
    return f"HeadsUp {__version__}"


@dataclass
class FileMeta:
    """What an input file carried, for its output. ``bits`` is 16 for 16-bit colour data, else 8."""

    icc_profile: bytes | None = None
    exif: bytes | None = None  # raw EXIF (``Exif.tobytes()`` form); orientation already applied and reset
    xmp: bytes | None = None
    text: dict[str, str] = field(default_factory=dict)  # PNG tEXt/zTXt/iTXt chunks (XMP excluded)
    bits: int = 8
    dpi: tuple[float, float] | None = None
    notes: list[str] = field(default_factory=list)  # what was done on reading (first frame, colour conversion)


def icc_colour_space(icc: bytes | None) -> str | None:
    """'RGB', 'GRAY', 'CMYK', ... from an ICC header (bytes 16..20), None if absent or malformed."""
    if not icc or len(icc) < 20:
        return None
    return icc[16:20].decode("ascii", "replace").strip()


def icc_readable(icc: bytes) -> bool:
    try:
        import io

        from PIL import ImageCms

        ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return True
    except Exception:  # noqa: BLE001 - littleCMS refuses it: a damaged profile
        return False


def icc_description(icc: bytes | None) -> str:
    if not icc:
        return "none"
    try:
        import io

        from PIL import ImageCms

        return ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc))).strip() or "unnamed"
    except Exception:  # noqa: BLE001 - a description is only for messages
        return "unreadable"


@functools.lru_cache(maxsize=1)
def srgb_icc() -> bytes:
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    # littleCMS stamps the creation time into the header (bytes 24-35); a fixed date keeps outputs reproducible
    # across runs and processes (the profile ID, which would cover it, is left unset, zero)
    return icc[:24] + struct.pack(">6H", 2024, 1, 1, 0, 0, 0) + icc[36:]


def quiet_exif(image):
    """``image.getexif()`` without Pillow's "Corrupt EXIF data" UserWarning (the caller says it once instead)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with warnings.catch_warnings():  # exif_orientation, called first, has said it once
            warnings.simplefilter("ignore")
            exif = image.getexif()
    if any("EXIF" in str(w.message) for w in caught):
        log.warning("headsup: %s: part of its EXIF block is corrupt; what could be read is kept.",
                    getattr(image, "filename", "") or "image")
    return exif


def exif_orientation(image) -> int:
    try:
        value = int(quiet_exif(image).get(ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block must not stop the read
        return 1
    return value if 1 <= value <= 8 else 1


def transpose_array(arr: np.ndarray, orientation: int) -> np.ndarray:
    """An HxW[xC] array turned upright for an EXIF orientation (the same as ``ImageOps.exif_transpose``)."""
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: np.swapaxes(a, 0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, -1)[:, ::-1],
           8: lambda a: np.rot90(a, 1)}
    if orientation not in ops:
        return arr
    return np.ascontiguousarray(ops[orientation](arr))


def _strip_xmp_gps(xmp: str) -> str:
    xmp = re.sub(r'\s+exif:GPS\w+="[^"]*"', "", xmp)
    return re.sub(r"<exif:(GPS\w+)\b[^>]*?(/>|>.*?</exif:\1>)", "", xmp, flags=re.S)


def clean_xmp(xmp: bytes | str | None, *, keep_gps: bool) -> bytes | None:
    """XMP with orientation 1 (it has been applied) and, unless ``keep_gps``, no GPS."""
    if not xmp:
        return None
    text = xmp.decode("utf-8", "replace") if isinstance(xmp, bytes) else xmp
    text = re.sub(r'tiff:Orientation="\d"', 'tiff:Orientation="1"', text)
    text = re.sub(r"<tiff:Orientation>\d</tiff:Orientation>", "<tiff:Orientation>1</tiff:Orientation>", text)
    if not keep_gps:
        text = _strip_xmp_gps(text)
    return text.encode("utf-8")


def parse_exif(raw: bytes | None):
    """A PIL ``Exif`` of ``raw`` (empty when there is none, or it cannot be read: then there is nothing to carry)."""
    from PIL import Image

    exif = Image.Exif()
    if raw:
        try:
            exif.load(raw)
        except Exception:  # noqa: BLE001 - unreadable EXIF: nothing to carry
            exif = Image.Exif()
    return exif


def output_exif(exif: bytes | None, size: tuple[int, int], *, keep_gps: bool) -> bytes:
    """EXIF for an output of ``size`` (w, h): Software set, dimensions updated, GPS dropped unless ``keep_gps``.

    The orientation tag is left as it is: readers reset it to 1 when they turn the pixels upright."""
    from PIL import Image

    data = Image.Exif()
    if exif:
        try:
            data.load(exif)
        except Exception:  # noqa: BLE001 - unreadable EXIF is replaced by a fresh block
            data = Image.Exif()
    data[SOFTWARE] = software_name()
    sub = data.get_ifd(EXIF_IFD)
    if sub:
        if PIXEL_X in sub:
            sub[PIXEL_X] = int(size[0])
        if PIXEL_Y in sub:
            sub[PIXEL_Y] = int(size[1])
    if not keep_gps and GPS_IFD in data:
        del data[GPS_IFD]  # (get_ifd on an absent GPS IFD would add an empty one)
    try:
        return data.tobytes()
    except Exception:  # noqa: BLE001 - a tag Pillow cannot write back: keep the essentials only
        fresh = Image.Exif()
        fresh[SOFTWARE] = software_name()
        return fresh.tobytes()


def meta_from_pil(image, *, transposed: bool) -> FileMeta:
    """The metadata of a freshly opened PIL image (before any frame/mode conversion)."""
    info = image.info
    meta = FileMeta(icc_profile=info.get("icc_profile") or None)
    try:
        with warnings.catch_warnings():  # exif_orientation, called first, has said it once
            warnings.simplefilter("ignore")
            exif = image.getexif()
        if transposed and ORIENTATION in exif:
            exif[ORIENTATION] = 1
        for tag in STRUCTURE_TAGS:
            if tag in exif:
                del exif[tag]
        meta.exif = exif.tobytes() if len(exif) or exif.get_ifd(EXIF_IFD) else None
    except Exception:  # noqa: BLE001 - a broken EXIF block is dropped, the pixels still count
        meta.exif = None
    xmp = info.get("xmp") or info.get(XMP_PNG_KEY)
    meta.xmp = xmp.encode("utf-8") if isinstance(xmp, str) else xmp
    text = getattr(image, "text", None) if image.format == "PNG" else None
    if text:
        meta.text = {k: str(v) for k, v in text.items() if k != XMP_PNG_KEY}
    dpi = info.get("dpi")
    if dpi and isinstance(dpi, tuple) and len(dpi) == 2:
        meta.dpi = (float(dpi[0]), float(dpi[1]))
    return meta
