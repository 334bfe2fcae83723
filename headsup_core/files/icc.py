"""A minimal ICC v2 matrix/TRC RGB profile (Display P3, Adobe RGB, ...), since littleCMS via Pillow builds only
sRGB. Used to make test images and to measure colour handling (docs/files_and_colour.md)."""
from __future__ import annotations

import struct

import numpy as np

D50 = np.array([0.9642, 1.0, 0.8249])
BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])
DISPLAY_P3 = {"name": "Display P3 (HeadsUp test)", "primaries": ((0.680, 0.320), (0.265, 0.690), (0.150, 0.060)),
              "white": (0.3127, 0.3290), "trc": "srgb"}
ADOBE_RGB = {"name": "Adobe RGB (1998) compatible (HeadsUp test)",
             "primaries": ((0.640, 0.330), (0.210, 0.710), (0.150, 0.060)), "white": (0.3127, 0.3290),
             "trc": 2.19921875}


def _xyz(xy) -> np.ndarray:
    x, y = xy
    return np.array([x / y, 1.0, (1 - x - y) / y])


def rgb_to_xyz_d50(primaries, white) -> np.ndarray:
    """The 3x3 matrix (columns: the colorants) from linear RGB to D50 XYZ, Bradford-adapted."""
    p = np.stack([_xyz(c) for c in primaries], axis=1)
    w = _xyz(white)
    m = p * np.linalg.solve(p, w)[None, :]
    cone_src, cone_dst = BRADFORD @ w, BRADFORD @ D50
    adapt = np.linalg.inv(BRADFORD) @ np.diag(cone_dst / cone_src) @ BRADFORD
    return adapt @ m


def _s15(v: float) -> bytes:
    return struct.pack(">i", int(round(v * 65536)))


def _tag_xyz(v) -> bytes:
    return b"XYZ \0\0\0\0" + b"".join(_s15(c) for c in v)


def _tag_curve(trc) -> bytes:
    if isinstance(trc, (int, float)):
        return b"curv\0\0\0\0" + struct.pack(">IH", 1, int(round(trc * 256))) + b"\0\0"
    x = np.linspace(0, 1, 1024)
    y = np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    return b"curv\0\0\0\0" + struct.pack(">I", len(y)) + np.round(y * 65535).astype(">u2").tobytes()


def _tag_desc(text: str) -> bytes:
    ascii_text = text.encode("ascii") + b"\0"
    return b"desc\0\0\0\0" + struct.pack(">I", len(ascii_text)) + ascii_text + b"\0" * 8 + b"\0\0\0" + b"\0" * 67


def _tag_text(text: str) -> bytes:
    return b"text\0\0\0\0" + text.encode("ascii") + b"\0"


def matrix_trc_profile(spec: dict) -> bytes:
    """ICC bytes for ``spec`` (name, primaries as xy, white as xy, trc: 'srgb' or a gamma)."""
    m = rgb_to_xyz_d50(spec["primaries"], spec["white"])
    curve = _tag_curve(spec["trc"])
    tags = [(b"desc", _tag_desc(spec["name"])), (b"cprt", _tag_text("No copyright, use freely")),
            (b"wtpt", _tag_xyz(D50)), (b"rXYZ", _tag_xyz(m[:, 0])), (b"gXYZ", _tag_xyz(m[:, 1])),
            (b"bXYZ", _tag_xyz(m[:, 2])), (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        while (offset + len(data)) % 4:
            data += b"\0"
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    body = struct.pack(">I", len(tags)) + table + data
    size = 128 + len(body)
    header = (struct.pack(">I", size) + b"\0\0\0\0" + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + struct.pack(">6H", 2026, 1, 1, 0, 0, 0) + b"acsp" + b"\0" * 24 + struct.pack(">I", 0)
              + b"".join(_s15(c) for c in D50) + b"\0" * 4 + b"\0" * 16 + b"\0" * 28)
    assert len(header) == 128
    return header + body
