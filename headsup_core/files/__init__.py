"""Image files: reading (size limit, orientation, metadata, first frame) and writing (format by extension,
bit depth, ICC profile, metadata, atomic). The array/tensor conversions live in ``headsup_core.imageio``."""
from .read import DEFAULT_MAX_PIXELS, Photo, load_image, max_pixels_limit, read_photo

__all__ = ["DEFAULT_MAX_PIXELS", "Photo", "load_image", "max_pixels_limit", "read_photo"]
