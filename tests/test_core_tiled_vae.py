"""Exact tiled VAE: whole-image GroupNorm statistics pooled over all tiles (OSEDiff's tiled-VAE default)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from headsup_core import HeadsUpPipeline
from headsup_core.tiled_vae import decoder_forward, encoder_forward, partition, run_exact
from headsup_core.tiling import TilePlan

CPU = torch.device("cpu")


def _vae(tiny_models):
    return HeadsUpPipeline.from_files(tiny_models["base"], tiny_models["osediff"], device="cpu").model.vae


def test_lockstep_forward_with_one_tile_is_the_diffusers_forward(tiny_models):
    vae = _vae(tiny_models)
    torch.manual_seed(0)
    x, z = torch.rand(1, 3, 128, 192) * 2 - 1, torch.randn(1, 4, 16, 24)
    with torch.no_grad():
        enc = vae.quant_conv(vae.encoder(x))
        dec = vae.decoder(vae.post_quant_conv(z))
    ours_enc = run_exact(encoder_forward, vae, x, tile=999, context=0, in_factor=8, out_factor=1, compute_device=CPU)
    ours_dec = run_exact(decoder_forward, vae, z, tile=999, context=0, in_factor=1, out_factor=8, compute_device=CPU)
    assert (ours_enc - enc).abs().max() < 1e-4 and (ours_dec - dec).abs().max() < 1e-4


def test_partition_covers_without_overlap():
    for length, tile in ((48, 16), (50, 16), (7, 16), (129, 64)):
        parts = partition(length, tile)
        assert parts[0][0] == 0 and parts[-1][1] == length
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:])) and max(b - a for a, b in parts) <= tile


def test_exact_tiling_is_closer_to_untiled_than_fast(tiny_models, t1_jpg):
    from PIL import Image

    pipe = HeadsUpPipeline.from_files(tiny_models["base"], tiny_models["osediff"], device="cpu")
    # A real photo, 384x384 output = 48x48 latents: 3x3 VAE tiles of 16 latents (UNet untiled in all runs).
    photo = np.asarray(Image.open(t1_jpg).convert("RGB").resize((96, 96), Image.BICUBIC))
    whole = TilePlan(encoder_tile=512, decoder_tile=512, unet_tile=512)
    ref = pipe.upscale(photo, 4, color_fix="none", tile_size=whole).astype(np.float64)
    diffs = {}
    for mode in ("exact", "fast"):
        plan = TilePlan(encoder_tile=16, decoder_tile=16, unet_tile=512, vae_mode=mode)
        assert plan.vae_tile_count(48, 48, "decoder") == (9 if mode == "exact" else plan.vae_tile_count(48, 48, "decoder"))
        out = pipe.upscale(photo, 4, color_fix="none", tile_size=plan).astype(np.float64)
        diffs[mode] = np.abs(out - ref).max()
    assert diffs["exact"] < diffs["fast"], diffs
    assert diffs["exact"] <= 8, diffs  # grey levels (tiny random VAE; global attention, pooled statistics)


def test_exact_decoder_with_more_context_converges_to_untiled(tiny_models):
    vae = _vae(tiny_models)
    torch.manual_seed(1)
    z = F.interpolate(torch.randn(1, 4, 12, 12), size=(48, 48), mode="bilinear")
    with torch.no_grad():
        ref = vae.decoder(vae.post_quant_conv(z))
    errs = [(run_exact(decoder_forward, vae, z, tile=16, context=c, in_factor=1, out_factor=8, compute_device=CPU)
             - ref).abs().max().item() for c in (2, 11)]
    assert errs[1] < errs[0] and errs[1] < 1e-2, errs


def test_exact_tiles_report_progress_while_they_run(tiny_pipe):
    """Lockstep tiles finish together; their progress ticks (and interrupt points) still arrive during the
    stage, one per tile in all, not all at the end."""
    decoder = tiny_pipe.model.vae.decoder
    conv_out_calls, seen = [], []
    hook = decoder.conv_out.register_forward_hook(lambda *a: conv_out_calls.append(1))
    try:
        import numpy as np

        img = (np.random.default_rng(0).random((48, 48, 3)) * 255).astype(np.uint8)
        _, info = tiny_pipe.upscale(img, 8, tile_size=128, color_fix="none", vae_tiling="exact", return_info=True,
                                    progress=lambda done, total: seen.append((done, total, len(conv_out_calls))))
    finally:
        hook.remove()
    plan = info["tile_plan"]
    n_dec = plan.vae_tile_count(48, 48, "decoder")
    assert n_dec > 1
    done, total = seen[-1][0], seen[-1][1]
    assert done == total == len(seen)  # every tile ticked exactly once
    decoder_ticks = [c for *_, c in seen[-n_dec:]]
    assert decoder_ticks[0] == 0  # the first decoder tick came before any tile reached conv_out
