"""Real-ESRGAN degradation: shapes, ranges, seeded reproducibility, every stage acts."""

import math

import pytest
import torch

from headsup_core.errors import HeadsUpError
from headsup_core.degradations import (RealESRGANDegradation, gaussian_kernel, image_seeds, jpeg_roundtrip,
                                             load_degradation_config, resize_back, sinc_kernel)


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
        _, stages = RealESRGANDegradation(cfg)(gt, seed=3, return_stages=True)
        st = {k: v[0] for k, v in stages.items()}  # image 0's stages
        order = ["blur1", "resize1", "noise1", "jpeg1", "blur2", "resize2", "noise2"]
        prev = gt[:1]
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


def test_random_choices_are_per_image():
    # identical images in one batch: per-batch choices would give every image the same first-resize size
    cfg = load_degradation_config(resize_prob=[0.0, 1.0, 0.0], resize_range=[0.2, 1.0])
    gt = _gt(b=1, h=64, w=64).expand(8, -1, -1, -1).contiguous()
    _, st = RealESRGANDegradation(cfg)(gt, seed=5, return_stages=True)
    sizes = {tuple(x.shape[-2:]) for x in st["resize1"]}
    assert len(sizes) > 3, sizes


def test_image_result_does_not_depend_on_batch_mates():
    deg, a, b, c = RealESRGANDegradation(), _gt(1, seed=1), _gt(1, seed=2), _gt(1, seed=3)
    x, y = deg(torch.cat([a, b]), seed=11), deg(torch.cat([a, c]), seed=11)
    assert torch.equal(x[0], y[0]) and not torch.equal(x[1], y[1])
    one, _ = deg.degrade_one(a, image_seeds(11, 2)[0])
    assert torch.equal(one[0], x[0])


def test_jpeg_is_a_real_codec_round_trip():
    cv2 = pytest.importorskip("cv2")
    import numpy as np

    img = _gt(1, h=64, w=64, seed=4)
    out = jpeg_roundtrip(img, 40)
    assert torch.allclose(out * 255, (out * 255).round(), atol=1e-4)  # decoded 8-bit pixels
    u8 = (img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    _, enc = cv2.imencode(".jpg", cv2.cvtColor(u8, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 40])
    ref = cv2.cvtColor(cv2.imdecode(enc, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    ref = torch.from_numpy(ref).permute(2, 0, 1).float()[None] / 255
    assert (out - ref).abs().mean() < 2 / 255  # another libjpeg build agrees to rounding
    assert (out - img).abs().mean() > 2 / 255  # and quality 40 really lost detail
    assert (jpeg_roundtrip(img, 95) - img).abs().mean() < (out - img).abs().mean()


def test_resize_back_mode_per_image_and_8bit():
    lq = _gt(1, h=16, w=16, seed=6).expand(12, -1, -1, -1)
    up = resize_back(lq, (64, 64), seed=0)
    assert up.shape == (12, 3, 64, 64)
    assert torch.allclose(up * 255, (up * 255).round(), atol=1e-4)
    distinct = {tuple(up[i].flatten()[:64].tolist()) for i in range(12)}
    assert len(distinct) >= 2  # several resize modes were drawn across the batch


def test_tiny_gt_survives_strong_downscale():
    # 0.15x first resize of a 32 px crop leaves 4 px, smaller than the 21-tap kernel's padding
    cfg = load_degradation_config(resize_prob=[0, 1, 0], resize_range=[0.15, 0.16], second_blur_prob=1.0)
    lq = RealESRGANDegradation(cfg)(_gt(h=32, w=32), seed=0)
    assert lq.shape == (2, 3, 8, 8) and torch.isfinite(lq).all()
