"""Reading photo files: hostile headers refused in one sentence, orientation, metadata, first frame."""
from __future__ import annotations

import struct
import zlib

import pytest
from PIL import Image

from headsup_core.cli import main
from headsup_core.errors import InputImageError


def _png_claiming(path, width: int, height: int) -> None:
    """A PNG whose IHDR claims width x height RGB pixels, with a tiny IDAT (a decompression-bomb header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _models(tiny_models) -> list[str]:
    return ["--base", str(tiny_models["base_single"]), "--weights", str(tiny_models["headsup"]), "--faces", "none"]


@pytest.mark.parametrize("side", [100_000, 12_000])  # far above Pillow's 2x error limit / between 1x and 2x (warning)
def test_pixel_bomb_is_one_sentence_via_cli(tmp_path, tiny_models, capsys, side):
    bomb, out = tmp_path / "bomb.png", tmp_path / "out.png"
    _png_claiming(bomb, side, side)
    assert main(["upscale", str(bomb), "-o", str(out), "-q"] + _models(tiny_models)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert str(bomb) in err and f"{side}x{side}" in err and "--max-pixels" in err and "HEADSUP_MAX_PIXELS" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".headsup-")]


def test_pixel_limit_is_the_same_in_the_library_and_can_be_raised(tmp_path, monkeypatch):
    from headsup_core.imageio import load_image

    img = tmp_path / "ok.png"
    Image.new("RGB", (40, 30)).save(img)
    with pytest.raises(InputImageError, match="40x30 pixels"):
        load_image(img, max_pixels=1000)
    monkeypatch.setenv("HEADSUP_MAX_PIXELS", "1000")
    with pytest.raises(InputImageError, match="limit of 1000 pixels"):
        load_image(img)
    assert load_image(img, max_pixels=1200).size == (40, 30)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's guard is left as it was
