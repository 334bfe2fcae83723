"""Reading photo files: hostile headers refused in one sentence, orientation, metadata, first frame."""
from __future__ import annotations

import struct
import zlib

import numpy as np
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
    from headsup_core.files.read import load_image

    img = tmp_path / "ok.png"
    Image.new("RGB", (40, 30)).save(img)
    with pytest.raises(InputImageError, match="40x30 pixels"):
        load_image(img, max_pixels=1000)
    monkeypatch.setenv("HEADSUP_MAX_PIXELS", "1000")
    with pytest.raises(InputImageError, match="limit of 1000 pixels"):
        load_image(img)
    assert load_image(img, max_pixels=1200).size == (40, 30)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's guard is left as it was


def _exif(orientation: int = 6, gps: bool = True) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "PhoneCo"
    exif[0x0112] = orientation
    exif[0x8769] = {0x9003: "2024:01:02 03:04:05"}
    if gps:
        exif[0x8825] = {1: "N", 2: (52.0, 31.0, 12.5)}
    return exif.tobytes()


def _marked(w: int = 30, h: int = 20) -> Image.Image:
    """Red left half, blue right half, a green top-left corner: any turn or flip is visible."""
    im = Image.new("RGB", (w, h), (200, 0, 0))
    im.paste((0, 0, 200), (w // 2, 0, w, h))
    im.paste((0, 200, 0), (0, 0, 4, 4))
    return im


def test_exif_orientation_is_applied_on_load_and_reset(tmp_path):
    from PIL import ImageOps

    from headsup_core.files import read_photo
    from headsup_core.files.read import load_image

    src = tmp_path / "phone.jpg"
    _marked().save(src, exif=_exif(6), quality=98, subsampling=0)
    expected = ImageOps.exif_transpose(Image.open(src))
    for image in (read_photo(src).pixels, load_image(src)):
        assert image.size == (20, 30)
        assert abs(np.asarray(image, np.int16) - np.asarray(expected, np.int16)).max() == 0
        exif = Image.Exif()
        exif.load(image.info["exif"])
        assert exif[0x0112] == 1 and exif[0x010F] == "PhoneCo"


def test_sixteen_bit_png_is_read_exactly(tmp_path):
    from headsup_core.files import read_photo
    from headsup_core.files.deep import png16_bytes

    rng = np.random.default_rng(0)
    for channels in (3, 4):
        arr = rng.integers(0, 65536, size=(17, 23, channels), dtype=np.uint16)
        arr[..., 0] = np.linspace(0, 65535, 23, dtype=np.uint16)  # smooth rows too
        path = tmp_path / f"c{channels}.png"
        path.write_bytes(png16_bytes(arr, None))
        photo = read_photo(path)
        assert photo.meta.bits == 16 and photo.pixels.dtype == np.uint16
        assert np.array_equal(photo.pixels, arr)
        with Image.open(path) as im:  # Pillow's own read keeps the high bytes: the file is a normal PNG
            assert np.array_equal(np.asarray(im), (arr >> 8).astype(np.uint8))


def test_sixteen_bit_tiff_is_read_as_sixteen_bit(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    from headsup_core.files import read_photo

    arr = np.random.default_rng(1).integers(0, 65536, size=(9, 11, 3), dtype=np.uint16)
    path = tmp_path / "camera.tif"
    tifffile.imwrite(path, arr, photometric="rgb", extratags=[(34675, "B", 4, b"icc!", True)])
    photo = read_photo(path)
    assert photo.meta.bits == 16 and np.array_equal(photo.pixels, arr)


def test_animated_image_gives_the_first_frame_and_one_notice(tmp_path, caplog):
    from headsup_core.files import read_photo

    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (12, 10), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with caplog.at_level("WARNING", logger="headsup"):
        photo = read_photo(path)
    assert np.asarray(photo.pixels.convert("RGB"))[0, 0].tolist() == [255, 0, 0]
    notes = [r for r in caplog.records if "3 frames" in r.getMessage()]
    assert len(notes) == 1 and "only the first" in notes[0].getMessage()


def test_sixteen_bit_tiff_without_tifffile_is_read_as_eight_bit_with_a_notice(tmp_path, monkeypatch, caplog):
    tifffile = pytest.importorskip("tifffile")
    from headsup_core.files import deep, read

    arr = np.full((6, 7, 3), 40000, np.uint16)
    path = tmp_path / "camera.tif"
    tifffile.imwrite(path, arr, photometric="rgb")
    monkeypatch.setattr(read, "have_tifffile", lambda: False)
    monkeypatch.setattr(deep, "have_tifffile", lambda: False)
    with caplog.at_level("WARNING", logger="headsup"):
        photo = read.read_photo(path)
    assert photo.meta.bits == 8 and photo.pixels.size == (7, 6)
    assert any("pip install tifffile" in r.getMessage() for r in caplog.records)


def test_cmyk_is_converted_to_srgb_and_tagged(tmp_path):
    from headsup_core.files import read_photo
    from headsup_core.files.meta import icc_description

    path = tmp_path / "print.jpg"
    Image.new("CMYK", (9, 7), (0, 255, 255, 0)).save(path)
    photo = read_photo(path)
    assert photo.pixels.mode == "RGB" and "sRGB" in icc_description(photo.meta.icc_profile)
    assert photo.pixels.getpixel((4, 3))[0] > 200 and photo.pixels.getpixel((4, 3))[1] < 60


def test_eval_and_dataset_readers_turn_phone_photos_upright(tmp_path):
    from headsup_core.eval.runner import _u8
    from headsup_core.train.data import _read_rgb

    src = tmp_path / "phone.jpg"
    _marked().save(src, exif=_exif(6), quality=98, subsampling=0)
    assert _u8(src).shape == (30, 20, 3)
    assert _read_rgb(str(src)).shape == (30, 20, 3)


def test_corrupt_exif_and_damaged_profile_give_one_notice_each(tmp_path, caplog, recwarn):
    from headsup_core.files import read_photo

    Image.new("RGB", (9, 7)).save(tmp_path / "badexif.jpg", exif=b"Exif\x00\x00MM\x00*garbage")
    Image.new("RGB", (9, 7)).save(tmp_path / "badicc.png", icc_profile=b"junkjunkjunkjunkRGB junk")
    with caplog.at_level("WARNING", logger="headsup"):
        assert read_photo(tmp_path / "badexif.jpg").pixels.size == (9, 7)
        assert read_photo(tmp_path / "badicc.png").meta.icc_profile is None
    notes = [r.getMessage() for r in caplog.records]
    assert sum("EXIF block is corrupt" in n for n in notes) == 1
    assert sum("ICC profile is damaged" in n for n in notes) == 1
    assert not [w for w in recwarn if "EXIF" in str(w.message)]
