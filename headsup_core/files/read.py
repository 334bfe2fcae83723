"""Reading image files: Pillow's decompression-bomb guard as one sentence, then the decoded image."""
from __future__ import annotations

import os
import warnings

from ..errors import InputImageError

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
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_big(path, limit) from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def load_image(path: str | os.PathLike, max_pixels: int | None = None):
    """Open an image file fully (so errors surface here, not later) and return a PIL image.

    Images above ``max_pixels`` (default: $HEADSUP_MAX_PIXELS, else Pillow's 89.5 megapixels) are refused."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputImageError(f"Image file not found: {path}")
    if os.path.isdir(path):
        raise InputImageError(f"Expected an image file but got a folder: {path}")
    try:
        with open_checked(path, max_pixels) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as err:
        if isinstance(err, InputImageError):
            raise
        raise InputImageError(f"Cannot read image {path}: {err}. Use a PNG, JPEG, WebP or TIFF file.") from None
