"""One upscale request (UpscaleOptions), one memory policy (budget -> tiles, overhead, OOM retry), interrupts,
and no CUDA calls on a CPU-only run. No timings."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from headsup_core import memory, planner, runner
from headsup_core.errors import HeadsUpError, InputImageError, InterruptedByUser
from headsup_core.options import UpscaleOptions
from headsup_core.tiling import TilePlan


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_options_validate_once_and_merge_keywords():
    with pytest.raises(InputImageError, match="colour fix"):
        UpscaleOptions(color_fix="sepia")
    with pytest.raises(InputImageError, match="strength"):
        UpscaleOptions(strength=2)
    with pytest.raises(InputImageError, match="scale"):
        UpscaleOptions(scale=0.5)
    with pytest.raises(InputImageError, match="too small"):
        UpscaleOptions(tile_size=32)
    base = UpscaleOptions(scale=2, color_fix="none", seed=3)
    assert UpscaleOptions.merge(base, scale=4.0, color_fix="adain") is base  # defaults do not override
    merged = UpscaleOptions.merge(base, strength=0.5, scale=3)
    assert (merged.scale, merged.color_fix, merged.seed, merged.strength) == (3.0, "none", 3, 0.5)
    with pytest.raises(TypeError, match="unknown upscale option"):
        UpscaleOptions.merge(None, colour="none")


def test_keyword_api_and_options_give_the_same_result(tiny_pipe):
    img = _rgb(24, 32)
    a = tiny_pipe.upscale(img, 2, color_fix="none", seed=1, strength=0.7)
    b = tiny_pipe.upscale(img, options=UpscaleOptions(scale=2, color_fix="none", seed=1, strength=0.7))
    assert np.array_equal(a, b)
    with pytest.raises(TypeError, match="unexpected keyword"):
        tiny_pipe.upscale(img, 2, colour_fix="none")


def test_halved_plan_and_its_floor():
    plan = TilePlan(encoder_tile=128, unet_tile=96, unet_overlap=32, decoder_tile=64)
    half = plan.halved()
    assert (half.encoder_tile, half.unet_tile, half.decoder_tile) == (64, 48, 32)
    assert half.unet_overlap == 16 and half.vae_mode == plan.vae_mode
    floor = TilePlan(encoder_tile=8, unet_tile=8, unet_overlap=2, decoder_tile=8)
    assert floor.halved() is None


def test_tile_overhead_for_a_known_plan():
    plan = TilePlan(encoder_tile=64, encoder_context=8, unet_tile=96, unet_overlap=32, decoder_tile=128)
    # UNet, 128x128 latents, 96/32: tiles are fitted to 80 -> 2x2 tiles of 80^2 = 25600 of 16384 pixels.
    assert memory.stage_overhead(plan, (128, 128), "unet") == (4, pytest.approx(25600 / 16384 - 1))
    # Exact VAE encoder: cores of 64 plus 8 latents of context inside the image -> 72x72 each.
    assert memory.stage_overhead(plan, (128, 128), "encoder") == (4, pytest.approx(4 * 72 * 72 / 16384 - 1))
    assert memory.stage_overhead(plan, (128, 128), "decoder") == (1, 0.0)  # untiled: no extra work
    fast = TilePlan(encoder_tile=64, encoder_overlap=8, vae_mode="fast")
    # Fast mode: 2 blended tiles per axis of 64 (fitted: 72 -> 64), each reading 8 latents of context.
    assert memory.stage_overhead(fast, (120, 64), "encoder")[0] == 2


def test_budget_decides_tiling(tiny_pipe):
    model, dev = tiny_pipe.model, tiny_pipe.device
    big = planner.plan_for_budget(model, (64, 48), 1 << 40, dev)
    assert (big.encoder_tile, big.unet_tile, big.decoder_tile) == (64, 64, 64)  # whole image everywhere
    assert all(memory.stage_overhead(big, (64, 48), s) == (1, 0.0) for s in memory.STAGES)
    budget = memory.image_bytes(model, (64, 48)) + 200_000
    small = planner.plan_for_budget(model, (64, 48), budget, dev)
    assert small.unet_tile < 64
    # Estimated under the budget the run gets (the exact VAE spills parked activations beyond it to disk).
    est = memory.estimate(model, small, (64, 48), dev, budget)
    whole = memory.estimate(model, big, (64, 48), dev, budget)
    assert est["peak"] == est["weights"] + est["activations"] and est["weights"] > 0
    assert est["unet"] < whole["unet"] and est["decoder"] <= whole["decoder"]  # never a plan that costs more
    # On a GPU the exact VAE parks tiles in CPU RAM, so VAE tiles do shrink the device's working set.
    gpu = memory.stage_bytes(model, TilePlan(decoder_tile=16), (64, 48), "decoder", torch.device("cuda"))
    assert gpu < memory.stage_bytes(model, TilePlan(decoder_tile=64), (64, 48), "decoder", torch.device("cuda"))


def test_budget_reaches_the_pipeline_and_timings_report_overhead(tiny_pipe, monkeypatch):
    img = _rgb(96, 80)
    _, info = tiny_pipe.upscale(img, 4, return_info=True, memory_budget_mb=1 << 20)
    t = info["timings"][0]
    assert (t["unet_tiles"], t["unet_overhead"], t["decode_tiles"], t["decode_overhead"]) == (1, 0.0, 1, 0.0)
    _, info = tiny_pipe.upscale(img, 4, return_info=True, memory_budget_mb=1.0)
    t = info["timings"][0]
    assert t["unet_tiles"] > 1 and t["unet_overhead"] > 0
    _, info = tiny_pipe.upscale(img, 4, return_info=True, memory_budget_mb=1.0, vae_tiling="fast")
    t = info["timings"][0]
    assert t["decode_tiles"] > 1 and t["decode_overhead"] > 0 and t["encode_tiles"] > 1
    # The fraction comes from the option, else the environment.
    monkeypatch.setenv(memory.ENV_FRACTION, "0.25")
    assert memory.memory_fraction(None, torch.device("cpu")) == 0.25
    assert memory.memory_fraction(0.1, torch.device("cpu")) == 0.1
    monkeypatch.setattr(memory, "free_bytes", lambda device: 8 << 20)
    assert memory.budget_bytes(torch.device("cpu")) == 2 << 20


def test_oom_retry_halves_tiles_and_says_so(tiny_pipe, monkeypatch, caplog):
    img = _rgb(96, 96)
    real = tiny_pipe.model.predict_x0
    seen = []

    def picky(x, *a, **k):
        seen.append(x.shape[-1])
        if x.shape[-1] > 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(x, *a, **k)

    monkeypatch.setattr(tiny_pipe.model, "predict_x0", picky)
    with caplog.at_level(logging.WARNING, logger="headsup"):
        out = runner.upscale_with_retry(tiny_pipe, img, scale=4, color_fix="none", memory_budget_mb=1 << 20)
    assert out.shape == (384, 384, 3)
    assert seen[0] == 48 and max(seen[-4:]) <= 16  # untiled first, then halved until the UNet tiles fit
    assert sum("out of memory" in r.message and "retrying" in r.message for r in caplog.records) >= 2
    monkeypatch.setattr(tiny_pipe.model, "predict_x0", lambda *a, **k: (_ for _ in ()).throw(
        torch.OutOfMemoryError("out of memory")))
    with pytest.raises(HeadsUpError, match="smallest tiles"):
        runner.upscale_with_retry(tiny_pipe, _rgb(16, 16), scale=2)
    monkeypatch.setattr(tiny_pipe.model, "predict_x0", lambda *a, **k: (_ for _ in ()).throw(ValueError("bug")))
    with pytest.raises(ValueError, match="bug"):  # anything else is not retried
        runner.upscale_with_retry(tiny_pipe, _rgb(16, 16), scale=2)


def test_interrupt_callable_stops_between_tiles(tiny_pipe):
    calls = []

    def interrupt():
        calls.append(1)
        return len(calls) >= 3

    with pytest.raises(InterruptedByUser):
        tiny_pipe.upscale(_rgb(48, 48), 4, tile_size=64, interrupt=interrupt)
    with pytest.raises(InterruptedByUser, match="before"):
        tiny_pipe.upscale(_rgb(48, 48), 4, interrupt=lambda: True)


def test_nothing_calls_cuda_on_a_cpu_only_run(tiny_models, monkeypatch):
    from headsup_core import HeadsUpPipeline

    def boom(*args, **kwargs):
        raise AssertionError("a CUDA function was called on a CPU run")

    for name in ("mem_get_info", "synchronize", "empty_cache", "reset_peak_memory_stats", "max_memory_allocated",
                 "memory_reserved", "memory_allocated", "get_device_properties", "is_bf16_supported",
                 "current_device", "set_device", "init"):
        monkeypatch.setattr(torch.cuda, name, boom)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pipe = HeadsUpPipeline.from_files(tiny_models["base"], tiny_models["headsup"])  # device auto -> cpu
    assert pipe.device.type == "cpu"
    out, info = pipe.upscale(_rgb(24, 24), 2, return_info=True)
    assert out.shape == (48, 48, 3) and info["timings"][0]["unet_s"] >= 0
    runner.upscale_with_retry(pipe, _rgb(16, 16), scale=2)


def test_an_explicit_cpu_budget_maps_large_blocks_and_nothing_else_does(monkeypatch):
    """A CPU run given a budget in MB keeps freed tile buffers from staying resident; the default budget, GPUs and
    hosts (no budget in MB) leave the process's allocator alone."""
    from headsup_core import devices, memory

    calls = []
    monkeypatch.setattr(devices, "map_large_blocks", lambda threshold=1 << 20: calls.append(threshold) or True)
    assert not memory.hold_to_budget(torch.device("cpu"), None)
    assert not memory.hold_to_budget(torch.device("cuda"), 800)
    assert calls == []
    assert memory.hold_to_budget(torch.device("cpu"), 800) and calls == [1 << 20]


def test_upscale_with_a_budget_in_mb_applies_the_heap_rule(tiny_pipe, monkeypatch):
    from headsup_core import devices
    from headsup_core.options import UpscaleOptions

    seen = []
    monkeypatch.setattr(devices, "map_large_blocks", lambda threshold=1 << 20: seen.append(threshold) or True)
    img = torch.rand(1, 32, 32, 3)
    tiny_pipe.upscale(img, options=UpscaleOptions(scale=2))
    assert seen == []
    tiny_pipe.upscale(img, options=UpscaleOptions(scale=2, memory_budget_mb=200))
    assert seen == [1 << 20]


def test_map_large_blocks_on_this_libc():
    """glibc (Linux CI) accepts the threshold, once; elsewhere it is a no-op that says so. In a child process: the
    setting is process-wide."""
    import subprocess
    import sys

    code = ("from headsup_core import devices; a = devices.map_large_blocks(); b = devices.map_large_blocks(); "
            "devices.return_freed_memory(); print(a, b, devices._libc() is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    applied, again, has_glibc = out.stdout.split()
    assert applied == again == has_glibc
    if sys.platform.startswith("linux"):
        assert applied == "True"
