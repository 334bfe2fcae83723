"""Exact tiled VAE: whole-image GroupNorm statistics pooled over all tiles (OSEDiff's tiled-VAE default)."""
from __future__ import annotations

import copy
import errno
import os
import re
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from headsup_core import HeadsUpPipeline
from headsup_core.errors import InterruptedByUser
from headsup_core.geometry import partition
from headsup_core.options import UpscaleOptions
from headsup_core.tiled_vae import decoder_forward, encoder_forward, run_exact
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
        assert plan.tile_count("decoder", (48, 48)) == (9 if mode == "exact" else plan.tile_count("decoder", (48, 48)))
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
    n_dec = plan.tile_count("decoder", (48, 48))
    assert n_dec > 1
    done, total = seen[-1][0], seen[-1][1]
    assert done == total == len(seen)  # every tick given exactly once
    full_plan = tiny_pipe.plan((48, 48), UpscaleOptions(scale=8, tile_size=128, color_fix="none", vae_tiling="exact"))
    assert full_plan.tiles == plan and full_plan.stage_ticks("decoder") >= n_dec
    decoder_ticks = [c for *_, c in seen[-full_plan.stage_ticks("decoder"):]]
    assert decoder_ticks[0] == 0  # the first decoder tick came before any tile reached conv_out
    assert sum(c == 0 for c in decoder_ticks) > len(decoder_ticks) // 2  # most of them during the stage


# ------------------------------------------------------------------------------------------ spill store (issue 14)
@pytest.fixture
def spill_root(tmp_path, monkeypatch):
    """HEADSUP_SPILL_DIR in a fresh folder; records every SpillStore run_exact makes."""
    from headsup_core import spill

    root = tmp_path / "spill"
    root.mkdir()
    monkeypatch.setenv(spill.ENV_SPILL_DIR, str(root))
    made = []

    class Recording(spill.SpillStore):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(spill, "SpillStore", Recording)
    return root, made


def _stage_runs(vae, dtype, seed=0):
    """(encode, decode) of a small image/latent in 3x3 exact tiles, as callables taking ``ram_budget`` (and
    ``progress``); inputs converted to ``dtype`` inside each tile as the pipeline does."""
    g = torch.Generator().manual_seed(seed)
    x, z = torch.rand(1, 3, 192, 176, generator=g) * 2 - 1, torch.randn(1, 4, 24, 22, generator=g)

    def enc(vae, t, park):
        return encoder_forward(vae, t.to(dtype), park)

    def dec(vae, t, park):
        return decoder_forward(vae, t.to(dtype), park)

    def encode(ram_budget, progress=None):
        return run_exact(enc, vae, x, tile=8, context=3, in_factor=8, out_factor=1, compute_device=CPU,
                         ram_budget=ram_budget, progress=progress)

    def decode(ram_budget, progress=None):
        return run_exact(dec, vae, z, tile=8, context=3, in_factor=1, out_factor=8, compute_device=CPU,
                         ram_budget=ram_budget, progress=progress)
    return encode, decode


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_spilled_lockstep_is_bit_identical_and_leaves_nothing(tiny_models, spill_root, dtype):
    root, made = spill_root
    vae = copy.deepcopy(_vae(tiny_models)).to(dtype)  # channels_last on a CPU, as the pipeline runs it
    for run in _stage_runs(vae, dtype):
        in_ram = run(None)
        assert made[-1].spilled_bytes == 0 and made[-1].directory is None and not list(root.iterdir())
        for budget in (0, made[-1].peak_ram_bytes // 3):  # everything spilled; part in RAM, part on disk
            spilled = run(budget)
            store = made[-1]
            assert store.spilled_bytes > 0 and store.peak_ram_bytes <= budget
            assert torch.equal(spilled, in_ram)
            assert store.directory is None and not list(root.iterdir())  # files and directory removed


def test_spilling_under_inference_mode(tiny_models, spill_root):
    """ComfyUI runs nodes under ``torch.inference_mode``: activations are inference tensors (no version counter)."""
    with torch.inference_mode():
        vae = copy.deepcopy(_vae(tiny_models))
        for run in _stage_runs(vae, torch.float32):
            assert torch.equal(run(0), run(None))


@pytest.mark.parametrize("error", [InterruptedByUser, KeyboardInterrupt, RuntimeError])
def test_spill_files_are_removed_when_a_stage_fails(tiny_models, spill_root, error):
    root, made = spill_root
    _, decode = _stage_runs(_vae(tiny_models), torch.float32)
    dirs, ticks = [], []

    def progress():
        ticks.append(1)
        dirs.append(made[-1].directory)
        if len(ticks) == 3:
            assert list(root.iterdir()) and made[-1].disk_bytes > 0  # mid-stage: activations are on disk
            raise error("stop")

    with pytest.raises(error):
        decode(0, progress)
    assert dirs[-1] is not None and not os.path.exists(dirs[-1]) and not list(root.iterdir())


def test_full_spill_disk_names_the_directory(tiny_models, spill_root, monkeypatch):
    from headsup_core import spill

    root, _ = spill_root

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spill, "open", full, raising=False)
    _, decode = _stage_runs(_vae(tiny_models), torch.float32)
    with pytest.raises(spill.SpillSpaceError, match=f"spill directory {re.escape(str(root))}.*MB free"):
        decode(0)
    assert not list(root.iterdir())


def test_generators_hand_over_what_they_yield(tiny_models):
    """A suspended tile keeps no reference to the activation it yielded, nor to the normalised tensor it was
    sent; its residual is parked in the driver's store (here on disk), not in the generator's frame."""
    from headsup_core.spill import SpillStore

    vae = _vae(tiny_models)
    with SpillStore(ram_budget=0) as store, torch.no_grad():
        gen = decoder_forward(vae, torch.randn(1, 4, 8, 8), store.put)
        kind, norm, hand = gen.send(None)
        assert kind == "norm" and store.disk_bytes > 0  # the mid block's first residual, parked
        act = hand.pop()
        yielded = weakref.ref(act)
        normalised = norm(act)
        del act
        assert yielded() is None
        sent = weakref.ref(normalised)
        hand.append(normalised)
        del normalised
        kind, _, hand = gen.send(None)
        assert kind == "norm" and sent() is None
        later = weakref.ref(hand[0])
        hand.clear()
        assert later() is None
        gen.close()


def _sd21_like():
    """Stand-in with the SD2.1 model's widths and the CPU formats (fp32 encoder, bf16 decoder) for estimates."""
    vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=[128, 256, 512, 512]))
    unet = SimpleNamespace(config=SimpleNamespace(block_out_channels=[320, 640, 1280, 1280]))
    return SimpleNamespace(vae=vae, unet=unet, vae_scale=8, dtype=torch.float32, encoder_dtype=torch.float32,
                           decoder_dtype=torch.bfloat16)


def test_bounded_store_bounds_the_estimate_and_lets_large_images_tile():
    from headsup_core import memory, planner

    model, lat, budget = _sd21_like(), (256, 256), 3 << 30  # 2048² output
    plan = TilePlan(encoder_tile=64, decoder_tile=64, unet_tile=128)
    unbounded, bounded = memory.estimate(model, plan, lat, CPU), memory.estimate(model, plan, lat, CPU, budget)
    assert bounded["activations"] < unbounded["activations"] and bounded["peak"] < unbounded["peak"]
    assert bounded["activations"] <= budget
    # 4x the image: the unbounded estimate grows with it, the bounded one stays within the budget.
    big = memory.estimate(model, plan, (512, 512), CPU, budget)
    assert big["encoder"] <= budget and memory.estimate(model, plan, (512, 512), CPU)["encoder"] > 4 * budget
    # The planner tiles the VAE (the whole image does not fit) and the plan fits the budget.
    chosen = planner.plan_for_budget(model, lat, budget, CPU)
    assert chosen.encoder_tile < 256 and chosen.decoder_tile < 256
    assert memory.estimate(model, chosen, lat, CPU, budget)["activations"] <= budget
    # The budget the pipeline hands run_exact: what is left after the image buffers and the tile.
    left = memory.vae_ram_budget(model, chosen, lat, "decoder", CPU, budget_mb=budget / 2**20)
    assert 0 < left == budget - memory.image_bytes(model, lat) - memory.tile_bytes(model, chosen, lat, "decoder")


def test_pipeline_spills_under_a_small_budget_and_gives_the_same_picture(tiny_pipe, spill_root):
    root, made = spill_root
    img = (np.random.default_rng(3).random((48, 40, 3)) * 255).astype(np.uint8)
    kw = dict(tile_size=128, color_fix="none", vae_tiling="exact")
    roomy = tiny_pipe.upscale(img, 4, memory_budget_mb=1 << 20, **kw)
    assert made and all(s.spilled_bytes == 0 for s in made)
    made.clear()
    tight = tiny_pipe.upscale(img, 4, memory_budget_mb=0.01, **kw)
    assert len(made) == 2 and all(s.spilled_bytes > 0 for s in made)  # encoder and decoder spilled
    assert np.array_equal(roomy, tight) and not list(root.iterdir())


def test_spill_store_round_trip_keeps_bits_and_strides(spill_root):
    from headsup_core import spill

    root, _ = spill_root
    t = torch.randn(1, 6, 5, 7).to(torch.bfloat16).to(memory_format=torch.channels_last)
    with spill.SpillStore(ram_budget=0) as store:
        a, b = store.put(t), store.put(t)  # the same tensor twice (a residual that is also yielded): one file
        assert a.on_disk and store.disk_bytes == t.numel() * 2 and len(os.listdir(store.directory)) == 1
        before = t.clone()
        t.add_(1)  # changed in place after parking: a new copy
        c = store.put(t)
        assert store.disk_bytes == 2 * t.numel() * 2
        back = a.take()
        assert back.stride() == t.stride() and back.dtype == torch.bfloat16 and torch.equal(back, before)
        assert torch.equal(b.take(), back) and torch.equal(c.take(), t) and store.disk_bytes == 0
        with pytest.raises(RuntimeError, match="taken twice"):
            a.take()
        assert os.listdir(store.directory) == []  # each file goes when its last slot is taken
    assert not list(root.iterdir())
