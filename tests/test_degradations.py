"""Real-ESRGAN degradation: shapes, ranges, seeded reproducibility, every stage acts."""

import math

import pytest
import torch

from headsup_core.errors import HeadsUpError
from headsup_core.train.degradations import (RealESRGANDegradation, gaussian_kernel, load_degradation_config,
                                             sinc_kernel)


def _gt(b=2, h=64, w=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    # smooth structure + fine texture, so blur / noise / JPEG all have something to change
    base = torch.rand(b, 3, h // 8, w // 8, generator=g)
    img = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    return (img * 0.8 + 0.2 * torch.rand(b, 3, h, w, generator=g)).clamp(0, 1)


def test_defaults_match_real_esrgan():
    c = load_degradation_config()
    assert c["kernel_prob"] == [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]
    assert c["resize_prob"] == [0.2, 0.7, 0.1] and c["resize_range"] == [0.15, 1.5]
    assert c["resize_prob2"] == [0.3, 0.4, 0.3] and c["resize_range2"] == [0.3, 1.2]
    assert c["noise_range"] == [1, 30] and c["noise_range2"] == [1, 25]
    assert c["blur_sigma"] == [0.2, 3.0] and c["blur_sigma2"] == [0.2, 1.5]
    assert c["second_blur_prob"] == 0.8 and c["final_sinc_prob"] == 0.8 and c["sinc_prob"] == 0.1
    assert c["jpeg_range"] == [30, 95] and c["scale"] == 4


def test_user_yaml_overrides_and_unknown_keys(tmp_path):
    p = tmp_path / "d.yaml"
    p.write_text("scale: 2\n")
    assert load_degradation_config(p)["scale"] == 2
    p.write_text("scael: 2\n")
    with pytest.raises(HeadsUpError, match="scael"):
        load_degradation_config(p)


def test_kernels_are_normalised_and_shaped():
    k = gaussian_kernel(21, 2.0, 0.5, 0.3)
    assert k.shape == (21, 21) and math.isclose(k.sum().item(), 1.0, rel_tol=1e-9)
    assert k[10, 10] == k.max()
    s = sinc_kernel(math.pi / 3, 11, pad_to=21)
    assert s.shape == (21, 21) and math.isclose(s.sum().item(), 1.0, rel_tol=1e-9)
    assert s[:5].abs().sum() == 0  # padding is zero


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_shapes_ranges_and_quantisation(seed):
    gt = _gt()
    lq = RealESRGANDegradation()(gt, seed=seed)
    assert lq.shape == (2, 3, 16, 12) and lq.dtype == gt.dtype
    assert lq.min() >= 0 and lq.max() <= 1
    assert torch.allclose(lq * 255, (lq * 255).round(), atol=1e-3)  # LQ is 8-bit like a real JPEG


def test_seed_reproducible_and_varies():
    deg, gt = RealESRGANDegradation(), _gt()
    a, b, c = deg(gt, seed=7), deg(gt, seed=7), deg(gt, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_rejects_bad_sizes():
    with pytest.raises(HeadsUpError, match="divisible"):
        RealESRGANDegradation()(torch.rand(1, 3, 30, 32), seed=0)


def test_each_stage_changes_the_image():
    # force every stage to act (no 'keep' resizes, blur 2 and final sinc always on), both noise kinds
    for gauss in (1.0, 0.0):
        cfg = load_degradation_config(resize_prob=[0.0, 1.0, 0.0], resize_prob2=[0.0, 1.0, 0.0],
                                      second_blur_prob=1.0, final_sinc_prob=1.0, gaussian_noise_prob=gauss,
                                      gaussian_noise_prob2=gauss, jpeg_range=[30, 40], jpeg_range2=[30, 40])
        gt = _gt(h=128, w=128)
        _, st = RealESRGANDegradation(cfg)(gt, seed=3, return_stages=True)
        order = ["blur1", "resize1", "noise1", "jpeg1", "blur2", "resize2", "noise2"]
        prev = gt
        for name in order:
            cur = st[name]
            if cur.shape == prev.shape:
                assert (cur - prev).abs().mean() > 1e-4, name
            else:
                assert cur.shape[-1] < prev.shape[-1], name  # 'down' resize
            prev = cur
        assert set(st) >= {"final_sinc", "jpeg2"}
        names = list(st)  # the last two stages run in a random order; JPEG keeps the size
        j = names.index("jpeg2")
        assert (st["jpeg2"] - st[names[j - 1]]).abs().mean() > 1e-4


def test_tiny_gt_survives_strong_downscale():
    # 0.15x first resize of a 32 px crop leaves 4 px, smaller than the 21-tap kernel's padding
    cfg = load_degradation_config(resize_prob=[0, 1, 0], resize_range=[0.15, 0.16], second_blur_prob=1.0)
    lq = RealESRGANDegradation(cfg)(_gt(h=32, w=32), seed=0)
    assert lq.shape == (2, 3, 8, 8) and torch.isfinite(lq).all()
