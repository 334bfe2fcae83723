"""Helpers shared by the eval/A1111 tests (a plain module, imported with tests/ on sys.path by pytest)."""
import os

import numpy as np


def t1_path() -> str:
    import insightface

    return os.path.join(os.path.dirname(insightface.__file__), "data", "images", "t1.jpg")


def t1_small(width: int = 320) -> np.ndarray:
    """insightface's t1.jpg (six people, 1280x886) shrunk to ``width`` px, as HxWx3 uint8."""
    from PIL import Image

    im = Image.open(t1_path()).convert("RGB")
    return np.asarray(im.resize((width, round(im.height * width / im.width)), Image.Resampling.LANCZOS))
