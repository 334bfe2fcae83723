"""Writing photo files: format by extension, JPEG q95 4:4:4, WebP lossless, bit depth, ICC and metadata carried
(GPS only on request), Software set, atomic and honest about a full disk; the library keeps ICC and EXIF too."""
from __future__ import annotations

import errno

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from headsup_core.cli import main
from headsup_core.files.icc import DISPLAY_P3, matrix_trc_profile
from headsup_core.files.meta import XMP_PNG_KEY, icc_description

XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       b'<rdf:Description xmlns:exif="http://ns.adobe.com/exif/1.0/" xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
       b'xmlns:dc="http://purl.org/dc/elements/1.1/" tiff:Orientation="6" exif:GPSLatitude="52,31.2N" '
       b'dc:format="image/jpeg"/></rdf:RDF></x:xmpmeta>')


def _exif(orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "PhoneCo"
    exif[0x0112] = orientation
    exif[0x8769] = {0x9003: "2024:01:02 03:04:05", 0xA002: 30, 0xA003: 20}
    exif[0x8825] = {1: "N", 2: (52.0, 31.0, 12.5)}
    return exif.tobytes()


def _run(tiny_models, src, out, *extra) -> None:
    argv = ["upscale", str(src), "-o", str(out), "--scale", "2", "--base", str(tiny_models["base_single"]),
            "--weights", str(tiny_models["headsup"]), "--faces", "none", "-q", *extra]
    assert main(argv) == 0


def _read_exif(im) -> Image.Exif:
    return im.getexif()


def test_phone_jpeg_comes_out_upright_with_profile_and_metadata(tmp_path, tiny_models):
    src, out = tmp_path / "phone.jpg", tmp_path / "out.jpg"
    icc = matrix_trc_profile(DISPLAY_P3)
    Image.new("RGB", (30, 20), (180, 120, 90)).save(src, exif=_exif(6), icc_profile=icc, xmp=XMP, quality=95)
    _run(tiny_models, src, out)
    with Image.open(out) as im:
        assert im.size == (40, 60)  # upright: 20x30 at x2
        assert im.info["icc_profile"] == icc
        assert JpegImagePlugin.get_sampling(im) == 0  # 4:4:4
        assert max(im.quantization[0]) <= 12  # quality 95 (Pillow's default 75 reaches 61 in its luma table)
        exif = im.getexif()
        assert exif.get(0x0112, 1) == 1 and exif[0x010F] == "PhoneCo" and exif[0x0131].startswith("HeadsUp")
        assert exif.get_ifd(0x8769)[0xA002] == 40 and not exif.get_ifd(0x8825)
        xmp = im.info["xmp"]
        assert b'tiff:Orientation="1"' in xmp and b"GPS" not in xmp and b'dc:format="image/jpeg"' in xmp
    _run(tiny_models, src, tmp_path / "gps.jpg", "--keep-gps", "--jpeg-quality", "80")
    with Image.open(tmp_path / "gps.jpg") as im:
        assert im.getexif().get_ifd(0x8825)[1] == "N" and b"GPSLatitude" in im.info["xmp"]
        assert max(im.quantization[0]) > 12


def test_png_keeps_profile_text_and_xmp(tmp_path, tiny_models):
    from PIL import PngImagePlugin

    src, out = tmp_path / "p3.png", tmp_path / "out.png"
    icc = matrix_trc_profile(DISPLAY_P3)
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "Ada")
    info.add_itxt(XMP_PNG_KEY, XMP.decode())
    Image.new("RGB", (12, 10), (30, 200, 60)).save(src, icc_profile=icc, pnginfo=info, exif=_exif(1))
    _run(tiny_models, src, out)
    with Image.open(out) as im:
        assert im.size == (24, 20) and im.info["icc_profile"] == icc
        assert im.text["Author"] == "Ada" and im.text["Software"].startswith("HeadsUp")
        assert b"GPS" not in im.info["xmp"]
        assert im.getexif()[0x010F] == "PhoneCo"


def test_sixteen_bit_png_and_tiff_stay_sixteen_bit(tmp_path, tiny_models):
    tifffile = pytest.importorskip("tifffile")
    from headsup_core.files import read_photo
    from headsup_core.files.deep import png16_bytes
    from headsup_core.files.meta import FileMeta

    icc = matrix_trc_profile(DISPLAY_P3)
    arr = np.random.default_rng(0).integers(20000, 40000, size=(10, 14, 3), dtype=np.uint16)
    png, tif = tmp_path / "in16.png", tmp_path / "in16.tif"
    png.write_bytes(png16_bytes(arr, FileMeta(icc_profile=icc)))
    tifffile.imwrite(tif, arr, photometric="rgb", extratags=[(34675, "B", len(icc), icc, True)])
    _run(tiny_models, png, tmp_path / "out16.png")
    _run(tiny_models, tif, tmp_path / "out16.tif")
    for out in (tmp_path / "out16.png", tmp_path / "out16.tif"):
        photo = read_photo(out)
        assert photo.meta.bits == 16 and photo.pixels.dtype == np.uint16 and photo.pixels.shape == (20, 28, 3)
        assert photo.meta.icc_profile == icc
        assert len(np.unique(photo.pixels % 257)) > 1  # real 16-bit values, not 8-bit ones scaled up
    with tifffile.TiffFile(tmp_path / "out16.tif") as t:
        assert t.pages[0].dtype == np.uint16 and "HeadsUp" in t.pages[0].software


def test_webp_is_lossless_by_default(tmp_path):
    from headsup_core.files.write import save_photo

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8))
    save_photo(image, tmp_path / "a.webp")
    save_photo(image, tmp_path / "b.webp", webp_quality=50)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.webp").convert("RGB")), np.asarray(image))
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "b.webp").convert("RGB")), np.asarray(image))


def test_unknown_extension_and_bad_quality_are_refused(tmp_path, tiny_models, capsys):
    src = tmp_path / "in.png"
    Image.new("RGB", (8, 8)).save(src)
    base = ["--base", str(tiny_models["base_single"]), "--faces", "none", "-q"]
    assert main(["upscale", str(src), "-o", str(tmp_path / "o.jpg"), "--jpeg-quality", "101"] + base) == 2
    assert "--jpeg-quality must be between 0 and 100" in capsys.readouterr().err
    from headsup_core.errors import OutputError
    from headsup_core.files.write import save_photo

    with pytest.raises(OutputError, match="unknown image extension"):
        save_photo(Image.new("RGB", (4, 4)), tmp_path / "o.xyz")


def test_full_disk_leaves_no_partial_file(tmp_path, monkeypatch):
    from headsup_core.errors import OutputError
    from headsup_core.files.write import save_photo

    def full(self, fp, *args, **kwargs):
        with open(fp, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(OutputError, match=f"no space left on {tmp_path}"):
        save_photo(Image.new("RGB", (4, 4)), tmp_path / "out.png")
    assert list(tmp_path.iterdir()) == []


def test_library_upscale_keeps_icc_and_exif(tiny_pipe):
    icc = matrix_trc_profile(DISPLAY_P3)
    image = Image.new("RGB", (10, 8), (100, 150, 200))
    image.info.update(icc_profile=icc, exif=_exif(1))
    out = tiny_pipe.upscale(image, scale=2)
    assert out.info["icc_profile"] == icc
    exif = Image.Exif()
    exif.load(out.info["exif"])
    assert exif[0x010F] == "PhoneCo" and exif[0x0131].startswith("HeadsUp")
    plain = tiny_pipe.upscale(Image.new("RGB", (10, 8)), scale=2)
    assert "sRGB" in icc_description(plain.info["icc_profile"]) and plain.info["exif"]


def test_wide_gamut_input_is_retagged_not_converted(tmp_path, tiny_models):
    """docs/files_and_colour.md: re-tagging gave the smaller colour error, so a P3 file's code values go to the
    model unchanged and its profile comes back on the output."""
    pixels = np.random.default_rng(3).integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
    icc = matrix_trc_profile(DISPLAY_P3)
    Image.fromarray(pixels).save(tmp_path / "p3.png", icc_profile=icc)
    Image.fromarray(pixels).save(tmp_path / "plain.png")
    _run(tiny_models, tmp_path / "p3.png", tmp_path / "p3_out.png")
    _run(tiny_models, tmp_path / "plain.png", tmp_path / "plain_out.png")
    with Image.open(tmp_path / "p3_out.png") as p3, Image.open(tmp_path / "plain_out.png") as plain:
        assert p3.info["icc_profile"] == icc and "sRGB" in icc_description(plain.info["icc_profile"])
        assert np.array_equal(np.asarray(p3), np.asarray(plain))


def test_tiff_layout_tags_stay_out_of_the_exif_and_tiff_output_keeps_camera_tags(tmp_path):
    from headsup_core.files import read_photo
    from headsup_core.files.write import save_photo

    exif = Image.Exif()
    exif[0x010F] = "ScanCo"
    Image.new("RGB", (30, 20), (9, 99, 199)).save(tmp_path / "in.tif", exif=exif.tobytes())
    photo = read_photo(tmp_path / "in.tif")
    big = photo.pixels.resize((60, 40))
    save_photo(big, tmp_path / "o.jpg", photo.meta)
    save_photo(big, tmp_path / "o.tif", photo.meta)
    with Image.open(tmp_path / "o.jpg") as jpg:
        tags = jpg.getexif()
        assert tags[0x010F] == "ScanCo" and 256 not in tags and 273 not in tags and 0x8825 not in tags
    with Image.open(tmp_path / "o.tif") as tif:
        assert tif.size == (60, 40) and tif.tag_v2[0x010F] == "ScanCo" and tif.tag_v2[305].startswith("HeadsUp")


def test_output_permissions_are_those_of_a_plain_new_file(tmp_path):
    """The atomic write goes through mkstemp (0600); the photo it leaves must be readable like any new file, and an
    overwritten output keeps its own permissions."""
    import os

    from headsup_core.files.write import save_image_atomic

    img = np.zeros((4, 4, 3), np.uint8)
    umask = os.umask(0o022)
    try:
        save_image_atomic(img, tmp_path / "new.png")
        assert (tmp_path / "new.png").stat().st_mode & 0o777 == 0o644
        (tmp_path / "new.png").chmod(0o600)
        save_image_atomic(img, tmp_path / "new.png")
        assert (tmp_path / "new.png").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(umask)
