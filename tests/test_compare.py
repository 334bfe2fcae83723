"""Comparison pictures: the grid has the promised size; `headsup compare` writes it from the tiny models."""
import numpy as np
import pytest
from PIL import Image

from headsup_core.eval.compare import grid_size, make_grid
from eval_util import t1_path, t1_small


def test_grid_has_expected_size_and_content(tmp_path):
    gt = t1_small(256)
    lq = gt[::4, ::4]
    rows = [[("LQ", lq), ("bicubic", gt), ("blend", gt), ("GT", gt)]]
    metrics = [{"bicubic": {"psnr": 24.123, "lpips": None}, "blend": {"psnr": 25.0, "ssim": 0.8}}]
    out = tmp_path / "grid.png"
    size = make_grid(rows, out, metrics=metrics, face_boxes=[[100, 40, 150, 100]], tile_width=200, title="tiny")
    tile_h = round(200 * gt.shape[0] / gt.shape[1])
    assert size == grid_size(4, 1, 200, tile_h, title=True)
    with Image.open(out) as im:
        assert im.size == size and im.format == "PNG"
        arr = np.asarray(im.convert("RGB"))
    assert arr.std() > 10  # images were drawn, not a blank canvas


def test_compare_cli_on_tiny_models(tmp_path, request, tmp_path_factory):
    pytest.importorskip("insightface")
    pytest.importorskip("pyiqa")
    tiny = request.getfixturevalue("tiny_models")
    from headsup_core.cli import main  # the real `headsup` entry point, which registers eval/compare

    out = tmp_path / "cmp.png"
    rc = main([
        "compare", t1_path(), "--max-side", "128", "--scale", "2", "--method", "bicubic,blend,headsup",
        "--base", str(tiny["base"]), "--weights", str(tiny["headsup"]), "--osediff-weights", str(tiny["osediff"]),
        "--face-models", str(tiny["insightface_root"]), "--face-pack", "tiny", "--metrics", "psnr,ssim",
        "--metrics-root", str(tmp_path / "metrics"), "--tile-width", "160", "-o", str(out)])
    assert rc == 0
    # columns: LQ, bicubic, blend, headsup, GT; GT 128 x 88 (shrunk t1.jpg, cropped to even)
    expected = grid_size(5, 1, 160, round(160 * 88 / 128))
    with Image.open(out) as im:
        assert im.size == expected
