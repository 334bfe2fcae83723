"""Pipeline behaviour: exact sizes for awkward inputs, bad input, tiling, batches, colour, progress, NaN retry."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from headsup_core.color import adain_color_fix, apply_color_fix, wavelet_color_fix
from headsup_core.errors import InputImageError, InterruptedByUser
from headsup_core.tiling import gaussian_weights, run_tiled, tile_starts


def _rgb(h, w, seed=0):
    return (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)


@pytest.mark.parametrize("h,w,scale", [(37, 53, 3.5), (1, 40, 2.0), (40, 1, 2.0), (17, 9, 4.0), (24, 24, 1.0)])
def test_output_size_is_exactly_round_input_times_scale(tiny_pipe, h, w, scale):
    out = tiny_pipe.upscale(_rgb(h, w), scale=scale)
    assert out.shape == (round(h * scale), round(w * scale), 3) and out.dtype == np.uint8


def test_greyscale_stays_greyscale(tiny_pipe):
    grey = Image.fromarray(_rgb(20, 30)[:, :, 0], "L")
    out = tiny_pipe.upscale(grey, scale=2)
    assert out.mode == "L" and out.size == (60, 40)


def test_rgba_alpha_is_resized_and_carried_through(tiny_pipe):
    rgba = np.dstack([_rgb(20, 30), np.zeros((20, 30), np.uint8)])
    rgba[:, 15:, 3] = 255  # right half opaque
    out = tiny_pipe.upscale(Image.fromarray(rgba, "RGBA"), scale=2)
    assert out.mode == "RGBA" and out.size == (60, 40)
    alpha = np.asarray(out)[:, :, 3]
    assert alpha[:, :25].max() <= 5 and alpha[:, 35:].min() >= 250


def test_16_bit_png_round_trips_at_16_bit(tiny_pipe, tmp_path):
    from headsup_core.files.read import load_image

    src = (np.random.RandomState(1).rand(12, 16) * 65535).astype(np.uint16)
    Image.fromarray(src).save(tmp_path / "in16.png")
    out = tiny_pipe.upscale(load_image(tmp_path / "in16.png"), scale=2)
    arr = np.asarray(out)
    assert arr.shape == (24, 32) and arr.dtype in (np.uint16, np.int32) and arr.max() > 255


def test_tensor_in_tensor_out(tiny_pipe):
    x = torch.rand(2, 16, 24, 3)
    out = tiny_pipe.upscale(x, scale=2)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 32, 48, 3) and 0 <= out.min() <= out.max() <= 1


@pytest.mark.parametrize("scale", [0.5, 0, -2, float("nan"), 64])
def test_unsupported_scale_is_refused(tiny_pipe, scale):
    with pytest.raises(InputImageError, match="scale"):
        tiny_pipe.upscale(_rgb(8, 8), scale=scale)


@pytest.mark.parametrize("bad", [np.zeros((0, 10, 3), np.uint8), torch.zeros(1, 0, 5, 3), np.zeros((4, 4, 5), np.uint8),
                                 torch.zeros(1, 4, 4, 3, dtype=torch.int64), "not an image"])
def test_bad_images_are_refused_clearly(tiny_pipe, bad):
    with pytest.raises(InputImageError):
        tiny_pipe.upscale(bad, scale=2)


def test_bad_options_are_refused(tiny_pipe):
    with pytest.raises(InputImageError, match="colour fix"):
        tiny_pipe.upscale(_rgb(8, 8), color_fix="magic")
    with pytest.raises(InputImageError, match="tile_size"):
        tiny_pipe.upscale(_rgb(8, 8), tile_size=8)
    with pytest.raises(InputImageError, match="prompt embedding"):
        tiny_pipe.upscale(_rgb(8, 8), prompt_embeds=torch.zeros(1, 77, 1024))


def test_unreadable_image_file(tmp_path):
    from headsup_core.files.read import load_image

    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(InputImageError, match="Cannot read image"):
        load_image(tmp_path / "broken.png")


def test_single_tile_is_identical_to_untiled(tiny_pipe):
    img = _rgb(32, 40)
    a = tiny_pipe.upscale(img, 2, tile_size=4096, color_fix="none")
    m = tiny_pipe.model
    with torch.no_grad():
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        up = torch.nn.functional.interpolate(x, size=(64, 80), mode="bicubic", align_corners=False).clamp(0, 1)
        z = m.encode(up * 2 - 1)
        from headsup_core.model import assemble_unet_input

        x0 = m.predict_x0(assemble_unet_input(z), z, m.default_prompt_embeds)
        ref = ((m.decode(x0) + 1) / 2).clamp(0, 1)
    ref = (ref[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(a, ref)


def _column_seam_ratio(img: np.ndarray) -> float:
    """Largest column-average horizontal gradient over the median one: a hard seam makes a spike."""
    grad = np.abs(np.diff(img.astype(np.float32), axis=1)).mean(axis=(0, 2))
    return float(grad.max() / np.median(grad))


def test_tiled_vae_is_close_to_untiled(tiny_pipe, monkeypatch):
    from headsup_core.tiling import TilePlan

    img = _rgb(48, 64, seed=3)
    whole = tiny_pipe.upscale(img, 4, tile_size=4096, color_fix="none").astype(np.float32)
    # VAE encoder and decoder in 16-latent tiles, the UNet in one: shared GroupNorm statistics and context
    # margins keep VAE tiles within a few grey levels of the untiled result.
    tiled = tiny_pipe.upscale(img, 4, color_fix="none", tile_size=TilePlan(16, 4, 4096, 32, 16, 4)).astype(np.float32)
    assert np.abs(whole - tiled).mean() < 3.5, np.abs(whole - tiled).mean()


def test_fully_tiled_output_has_no_seams(tiny_pipe):
    img = _rgb(48, 96, seed=4)
    whole = tiny_pipe.upscale(img, 4, tile_size=4096, color_fix="none")
    tiled = tiny_pipe.upscale(img, 4, tile_size=128, color_fix="none")
    # Tiny random UNets attend globally, so tiles are not close to the untiled run in value; what must hold
    # is that Gaussian blending leaves no gradient spike where tiles meet.
    assert _column_seam_ratio(tiled) < 1.5 * _column_seam_ratio(whole) + 0.5


def test_run_tiled_blends_to_identity_and_bounds_tile_size():
    x = torch.randn(1, 3, 40, 56)
    seen = []

    def ident(t):
        seen.append(tuple(t.shape[-2:]))
        return t

    out = run_tiled(ident, x, tile=16, overlap=4, in_factor=1, out_factor=1, out_channels=3,
                    compute_device=torch.device("cpu"))
    assert torch.allclose(out, x, atol=1e-5)
    assert max(h for h, _ in seen) <= 16 and max(w for _, w in seen) <= 16 and len(seen) > 4
    starts = tile_starts(100, 16, 4)
    assert starts[0] == 0 and starts[-1] == 84 and all(b - a <= 12 for a, b in zip(starts, starts[1:]))
    assert gaussian_weights(8, 8).min() > 0


def test_tile_memory_does_not_grow_with_image(tiny_pipe, monkeypatch):
    """The decoder only ever sees tiles no larger than the plan (tile + context), whatever the image size."""
    from headsup_core import tiled_vae

    sizes = []
    real_forward = tiled_vae.decoder_forward

    def spy(vae, z, park):
        sizes.append(tuple(z.shape[-2:]))
        return real_forward(vae, z, park)

    monkeypatch.setattr(tiled_vae, "decoder_forward", spy)
    _, info = tiny_pipe.upscale(_rgb(64, 96), 4, tile_size=128, return_info=True)
    small, n_small = max(max(s) for s in sizes), len(sizes)
    sizes.clear()
    _, info_big = tiny_pipe.upscale(_rgb(128, 192), 4, tile_size=128, return_info=True)
    plan = info_big["tile_plan"]
    assert len(sizes) > n_small > 1  # more tiles, not bigger ones
    assert max(max(s) for s in sizes) == small <= plan.decoder_tile + 2 * plan.decoder_context


def test_batch_equals_one_at_a_time(tiny_pipe):
    batch = torch.rand(3, 16, 20, 3, generator=torch.Generator().manual_seed(0))
    together = tiny_pipe.upscale(batch, 2)
    alone = torch.cat([tiny_pipe.upscale(batch[i:i + 1], 2) for i in range(3)])
    # Same picture, not the same bits: a CPU's conv/GEMM kernels may sum in another order for another batch size.
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_deterministic_by_default_and_seed_only_matters_when_sampling(tiny_models):
    from headsup_core import HeadsUpPipeline

    img = _rgb(16, 16)
    pipe = HeadsUpPipeline.from_files(tiny_models["base"], tiny_models["headsup"], device="cpu")
    assert np.array_equal(pipe.upscale(img, 2, seed=1), pipe.upscale(img, 2, seed=2))
    sampling = HeadsUpPipeline.from_files(tiny_models["base"], tiny_models["headsup"], device="cpu",
                                          sample_latent=True)
    a, b = sampling.upscale(img, 2, seed=1), sampling.upscale(img, 2, seed=2)
    assert np.array_equal(a, sampling.upscale(img, 2, seed=1)) and not np.array_equal(a, b)


def test_strength_zero_stays_with_the_input_latent(tiny_pipe):
    img = _rgb(16, 16)
    full, none = tiny_pipe.upscale(img, 2, strength=1.0), tiny_pipe.upscale(img, 2, strength=0.0)
    assert not np.array_equal(full, none)
    with pytest.raises(InputImageError):
        tiny_pipe.upscale(img, 2, strength=1.5)


def test_prompt_through_the_text_encoder_and_its_absence(tiny_models, tiny_pipe):
    from headsup_core import HeadsUpPipeline

    img = _rgb(16, 16)
    default = tiny_pipe.upscale(img, 2)
    prompted = tiny_pipe.upscale(img, 2, prompt="a portrait photo")
    assert not np.array_equal(default, prompted)
    # A single-file base carries its own text encoder: the prompt works there too, as on the folder.
    single = HeadsUpPipeline.from_files(tiny_models["base_single"], tiny_models["headsup"], device="cpu")
    single_prompted = single.upscale(img, 2, prompt="a portrait photo")
    assert np.abs(single_prompted.astype(int) - prompted.astype(int)).max() <= 1


def test_progress_counts_every_tile_and_can_interrupt(tiny_pipe):
    calls = []
    tiny_pipe.upscale(_rgb(48, 48), 4, tile_size=64, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1][0] == calls[-1][1] == len(calls) and len(calls) > 3

    def stop(done, total):
        if done == 2:
            raise InterruptedByUser("stopped")

    with pytest.raises(InterruptedByUser):
        tiny_pipe.upscale(_rgb(48, 48), 4, tile_size=64, progress=stop)


def test_half_precision_nan_tile_is_retried_in_fp32(tiny_models, caplog):
    from headsup_core import HeadsUpPipeline

    pipe = HeadsUpPipeline.from_files(tiny_models["base"], tiny_models["headsup"], device="cpu", dtype="bf16")
    real = pipe.model.unet.forward

    def flaky(sample, *args, **kwargs):
        out = real(sample, *args, **kwargs)
        if sample.dtype == torch.bfloat16:  # the fp32 retry gets through
            out.sample[:] = float("nan")
        return out

    pipe.model.unet.forward = flaky
    with caplog.at_level("WARNING", logger="headsup"):
        out = pipe.upscale(_rgb(16, 16), 2)
    assert np.isfinite(out.astype(np.float32)).all() and out.std() > 0
    assert "retrying this tile in fp32" in caplog.text
    assert next(pipe.model.unet.parameters()).dtype == torch.bfloat16


def _hue(rgb: np.ndarray) -> float:
    import colorsys

    r, g, b = rgb.reshape(-1, 3).mean(0) / 255
    return colorsys.rgb_to_hsv(r, g, b)[0]


@pytest.mark.parametrize("mode", ["adain", "wavelet", "none"])
def test_colour_stays_with_the_input(tiny_pipe, mode):
    """Low frequencies of the output stay near the bicubic input; no mode rotates the hue."""
    base = np.zeros((24, 32, 3), np.uint8)
    base[..., 0], base[..., 1], base[..., 2] = 200, 120, 60  # warm skin-like tone
    img = np.clip(base.astype(int) + np.random.RandomState(0).randint(-20, 20, base.shape), 0, 255).astype(np.uint8)
    out = tiny_pipe.upscale(img, 2, color_fix=mode)
    if mode != "none":
        assert abs(_hue(out) - _hue(img)) < 0.02
        assert np.abs(out.reshape(-1, 3).mean(0) - img.reshape(-1, 3).mean(0)).max() < 4


def test_colour_fix_functions_are_exact_on_their_reference():
    x = torch.rand(1, 3, 32, 32)
    assert torch.allclose(adain_color_fix(x, x), x, atol=1e-4)
    assert torch.allclose(wavelet_color_fix(x, x), x, atol=1e-5)
    grey = torch.rand(1, 1, 32, 32).expand(1, 3, 32, 32)
    fixed = apply_color_fix(torch.rand(1, 3, 32, 32), grey, "adain")
    means = fixed.mean((-2, -1))[0]
    assert (means.max() - means.min()) < 1e-3  # a grey reference gives grey-balanced channels
