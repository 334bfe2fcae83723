"""Colour error of the two ways to run a wide-gamut (Display P3, Adobe RGB) photo through an sRGB-trained model.

    python bench/colour.py                 # a synthetic P3 test image (hue sweep, skin tones, greys)
    python bench/colour.py --image t1.jpg  # an sRGB photo re-encoded in P3, its saturation raised 25% in linear light

- convert: the P3 pixels are converted to sRGB (littleCMS via Pillow's ImageCms, relative colorimetric, 8-bit),
  the model runs, the result is converted back to P3 and tagged P3;
- re-tag: the model runs on the P3 code values and the result is tagged P3.

The "model" is a perfect colour keeper (bicubic x2), and the output is reduced back to the input size (box 2x2):
what remains is the error the file handling adds. Both are compared with the input in CIELAB (D50) via the
profile's own matrix and curve; figures are CIEDE2000 (mean, 95th percentile, max) over all pixels and over the
pixels outside the sRGB gamut. Printed as a Markdown table (docs/files_and_colour.md).
"""
from __future__ import annotations

import argparse
import io

import numpy as np
from PIL import Image, ImageCms

from headsup_core.files.icc import ADOBE_RGB, DISPLAY_P3, matrix_trc_profile, rgb_to_xyz_d50

SRGB_PRIMARIES = ((0.640, 0.330), (0.300, 0.600), (0.150, 0.060))


def _decode(u8: np.ndarray, trc) -> np.ndarray:
    x = u8.astype(np.float64) / 255.0
    if trc == "srgb":
        return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    return x ** trc


def _encode(lin: np.ndarray, trc) -> np.ndarray:
    lin = np.clip(lin, 0, 1)
    if trc == "srgb":
        x = np.where(lin <= 0.0031308, lin * 12.92, 1.055 * lin ** (1 / 2.4) - 0.055)
    else:
        x = lin ** (1 / trc)
    return np.round(x * 255).astype(np.uint8)


def lab(u8: np.ndarray, spec: dict) -> np.ndarray:
    from skimage.color import xyz2lab

    xyz = _decode(u8, spec["trc"]) @ rgb_to_xyz_d50(spec["primaries"], spec["white"]).T
    return xyz2lab(xyz, illuminant="D50", observer="2")


def out_of_srgb(u8: np.ndarray, spec: dict) -> np.ndarray:
    to_srgb = np.linalg.inv(rgb_to_xyz_d50(SRGB_PRIMARIES, spec["white"])) @ rgb_to_xyz_d50(spec["primaries"],
                                                                                          spec["white"])
    lin = _decode(u8, spec["trc"]) @ to_srgb.T
    return ((lin < -1e-4) | (lin > 1 + 1e-4)).any(-1)


def synthetic(spec: dict, side: int = 192) -> np.ndarray:
    """Top: a full-saturation hue sweep in the wide space; middle: skin tones; bottom: a grey ramp."""
    h = np.linspace(0, 1, side, endpoint=False)
    rows = side // 3
    hsv = np.stack([np.tile(h, (rows, 1)), np.linspace(1, 0.3, rows)[:, None].repeat(side, 1),
                    np.full((rows, side), 0.9)], -1)
    sweep = np.asarray(Image.fromarray((hsv * 255).astype(np.uint8), "HSV").convert("RGB"))
    t = np.linspace(0, 1, side)[None, :, None]
    skin = (np.array([225, 172, 140]) * (1 - t) + np.array([120, 75, 55]) * t).repeat(rows, 0).astype(np.uint8)
    grey = np.tile(np.linspace(0, 255, side).astype(np.uint8)[None, :, None], (side - 2 * rows, 1, 3))
    return np.concatenate([sweep, skin, grey], 0)


def from_photo(path: str, spec: dict, boost: float = 1.25) -> np.ndarray:
    """An sRGB photo's colours in the wide space, saturation raised in linear light (some leave sRGB)."""
    srgb = np.asarray(Image.open(path).convert("RGB"))[:512, :512]
    lin = _decode(srgb, "srgb") @ (np.linalg.inv(rgb_to_xyz_d50(spec["primaries"], spec["white"]))
                                   @ rgb_to_xyz_d50(SRGB_PRIMARIES, spec["white"])).T
    y = lin.mean(-1, keepdims=True)
    return _encode(y + (lin - y) * boost, spec["trc"])


def run(wide: np.ndarray, spec: dict) -> dict:
    from skimage.color import deltaE_ciede2000

    profile = ImageCms.ImageCmsProfile(io.BytesIO(matrix_trc_profile(spec)))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    intent = ImageCms.Intent.RELATIVE_COLORIMETRIC
    to_srgb = ImageCms.buildTransform(profile, srgb, "RGB", "RGB", intent)
    back = ImageCms.buildTransform(srgb, profile, "RGB", "RGB", intent)
    image = Image.fromarray(wide)
    size = image.size

    def model(im):  # a perfect colour keeper, then back to the input size
        return im.resize((size[0] * 2, size[1] * 2), Image.Resampling.BICUBIC).reduce(2)

    outputs = {"convert": ImageCms.applyTransform(model(ImageCms.applyTransform(image, to_srgb)), back),
               "re-tag": model(image)}
    ref, outside = lab(wide, spec), out_of_srgb(wide, spec)
    rows = {}
    for name, out in outputs.items():
        de = deltaE_ciede2000(ref, lab(np.asarray(out), spec))
        rows[name] = {"mean": de.mean(), "p95": np.percentile(de, 95), "max": de.max(),
                      "mean_outside": de[outside].mean() if outside.any() else float("nan")}
    rows["outside_share"] = outside.mean()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", help="an sRGB photo to re-encode (default: the synthetic test image)")
    args = parser.parse_args()
    print("| space | image | pixels outside sRGB | path | mean ΔE00 | p95 | max | mean outside sRGB |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in (DISPLAY_P3, ADOBE_RGB):
        wide = from_photo(args.image, spec) if args.image else synthetic(spec)
        rows = run(wide, spec)
        for name in ("convert", "re-tag"):
            r = rows[name]
            print(f"| {spec['name'].split(' (')[0]} | {'photo' if args.image else 'synthetic'} | "
                  f"{rows['outside_share']:.1%} | {name} | {r['mean']:.2f} | {r['p95']:.2f} | {r['max']:.2f} | "
                  f"{r['mean_outside']:.2f} |")


if __name__ == "__main__":
    main()
