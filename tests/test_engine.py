"""The engine's contracts: one plan per request (the budget read once, halved on OOM, the node reserving what
runs), options applied once, the backend's fp32 retry keyed on the compute dtype, and the defects of #20."""
from __future__ import annotations

import importlib
import logging

import numpy as np
import pytest
import torch

from headsup_core import devices, memory, precision, runner
from headsup_core.options import UpscaleOptions
from headsup_core.tiling import TilePlan


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_oom_errors_fall_back_to_the_cuda_oom_on_an_older_torch(monkeypatch):
    """torch < 2.5 has no torch.OutOfMemoryError: every RuntimeError must not become an out-of-memory."""
    monkeypatch.delattr(torch, "OutOfMemoryError", raising=False)
    try:
        old = importlib.reload(devices)
        assert old.OOM_ERRORS == (torch.cuda.OutOfMemoryError,)
        assert not any(t is RuntimeError for t in old.OOM_ERRORS)
    finally:
        monkeypatch.undo()
        importlib.reload(devices)
    assert devices.OOM_ERRORS == (torch.OutOfMemoryError,)


def test_encode_never_scans_the_whole_image(tiny_pipe, monkeypatch):
    """The empty-canvas test applies to references only; the LQ image is never reduced with abs().amax()."""
    seen = []
    real = torch.Tensor.abs

    def spy(self, *a, **k):
        seen.append(tuple(self.shape))
        return real(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "abs", spy)
    tiny_pipe.upscale(_rgb(32, 32), 2, color_fix="none")
    assert not [s for s in seen if len(s) == 4 and s[1] == 3 and s[-1] >= 64], seen


def test_fp32_retry_follows_the_compute_dtype_not_the_storage(tiny_models, caplog):
    """A UNet stored in fp16 but computing in fp32 (layerwise casting) gains nothing from an fp32 retry."""
    from headsup_core import HeadsUpPipeline

    pipe = HeadsUpPipeline.from_files(tiny_models["base"], tiny_models["headsup"], device="cpu", dtype="fp32",
                                      weight_dtype="fp16")
    unet = pipe.model.unet
    assert pipe.model.dtype == torch.float32 and unet.conv_in.weight.dtype == torch.float16
    calls = []
    real = unet.forward

    def poisoned(sample, *args, **kwargs):
        calls.append(sample.dtype)
        out = real(sample, *args, **kwargs)
        out.sample[:] = float("nan")
        return out

    unet.forward = poisoned
    with caplog.at_level(logging.WARNING, logger="headsup"):
        pipe.upscale(_rgb(16, 16), 2, color_fix="none")
    assert len(calls) == 1 and "retrying" not in caplog.text  # no second, identical fp32 run


def test_a_backend_without_fp32_retry_is_not_upcast_in_exact_stages(tiny_models, monkeypatch, caplog):
    """The whole-stage (exact tiles) retry honours the backend's choice like the per-tile one."""
    from headsup_core import HeadsUpPipeline

    monkeypatch.setenv(precision.ENV_BF16, "decoder")
    pipe = HeadsUpPipeline.from_files(tiny_models["base"], tiny_models["headsup"], device="cpu")
    pipe.model.retry_in_fp32 = False
    conv = pipe.model.vae.decoder.conv_out
    real = conv.forward
    monkeypatch.setattr(conv, "forward", lambda x: real(x) * float("nan"))
    with caplog.at_level(logging.WARNING, logger="headsup"):
        out = pipe.upscale(_rgb(24, 24), 4, tile_size=64, vae_tiling="exact", color_fix="none")
    assert "retrying" not in caplog.text and out is not None


def test_a_passed_option_wins_also_at_its_default(tiny_pipe):
    """``upscale(options=o, strength=1.0)`` sets the strength back to 1 (the default), once."""
    img = _rgb(16, 16)
    half = UpscaleOptions(scale=2, strength=0.5, color_fix="none")
    back = tiny_pipe.upscale(img, options=half, strength=1.0)
    assert np.array_equal(back, tiny_pipe.upscale(img, 2, color_fix="none"))
    assert not np.array_equal(back, tiny_pipe.upscale(img, options=half))
    assert UpscaleOptions.override(half, strength=1.0).strength == 1.0
    assert UpscaleOptions.override(half) is half


def test_the_budget_is_read_once_per_request(tiny_pipe, monkeypatch):
    reads = []
    real = memory.budget_bytes
    monkeypatch.setattr(memory, "budget_bytes", lambda *a, **k: reads.append(a) or real(*a, **k))
    _, info = runner.upscale_with_retry(tiny_pipe, _rgb(24, 24), scale=4, tile_size=64, vae_tiling="exact",
                                        return_info=True)
    assert info["tile_plan"].tile_count("decoder", (12, 12)) > 1  # exact tiles ran (they park activations)
    assert len(reads) == 1


def test_oom_retry_runs_the_halved_plan_and_the_host_sees_each(tiny_pipe, monkeypatch):
    class Recording(runner.Host):
        def __init__(self):
            super().__init__()
            self.plans, self.ooms = [], 0

        def before_try(self, plan):
            self.plans.append(plan)

        def after_oom(self):
            self.ooms += 1

    real = tiny_pipe.model.predict_x0

    def picky(unet_input, *a, **k):
        if unet_input.shape[-1] > 8:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return real(unet_input, *a, **k)

    monkeypatch.setattr(tiny_pipe.model, "predict_x0", picky)
    host = Recording()
    _, info = runner.upscale_with_retry(tiny_pipe, _rgb(32, 32), scale=4, tile_size=256, host=host,
                                        return_info=True)
    assert host.ooms == len(host.plans) - 1 >= 1
    assert [p.tiles for p in host.plans[1:]] == [p.halved().tiles for p in host.plans[:-1]]
    assert info["tile_plan"] == host.plans[-1].tiles  # the plan the host was told about is the one that ran


def test_plan_grid_drives_estimate_and_progress(tiny_pipe):
    plan = tiny_pipe.plan((24, 32), UpscaleOptions(scale=4, tile_size=64, vae_tiling="exact"))
    grids = {s: plan.grid(s) for s in ("encoder", "unet", "decoder")}
    assert all(len(g) > 1 for g in grids.values())
    # exact VAE cores partition the latent; each tile reads its context around the core
    lh, lw = plan.latent_hw
    assert sum((t.core[1] - t.core[0]) * (t.core[3] - t.core[2]) for t in grids["decoder"]) == lh * lw
    assert memory.stage_reads(plan.tiles, plan.latent_hw, "decoder") == [t.read_hw for t in grids["decoder"]]
    ticks = []
    tiny_pipe.upscale(_rgb(24, 32), options=plan.options, plan=plan, progress=lambda d, t: ticks.append((d, t)))
    assert ticks[-1] == (plan.ticks_per_image(), plan.ticks_per_image()) == (len(ticks), len(ticks))
    with pytest.raises(TypeError, match="plan's own options"):
        tiny_pipe.upscale(_rgb(24, 32), plan=plan, strength=0.5)


def test_overlap_rules_are_written_once():
    from headsup_core.tiling import overlap_for

    plan = TilePlan.from_tile_size(1024)  # 128 latents
    assert (plan.encoder_overlap, plan.unet_overlap) == (overlap_for("encoder", 128), overlap_for("unet", 128))
    assert TilePlan().with_tile("unet", 128, cap=32).unet_overlap == 32
    half = plan.halved()
    assert half.unet_tile == 64 and half.unet_overlap == overlap_for("unet", 64)


def test_host_dtypes_come_from_precision():
    cuda = torch.device("cuda")
    assert precision.host_dtype("fp16", torch.device("cpu")) == torch.float16  # a named choice is kept
    assert precision.host_dtype(None, torch.device("cpu")) is None  # the CPU's per-stage policy
    assert precision.host_dtype(None, cuda, no_half=True) == torch.float32
    assert precision.host_dtype("auto", cuda, bf16_ok=True, fp16_ok=True) == torch.float16  # never bf16 first
    assert precision.host_dtype("auto", cuda, fp16_ok=False, bf16_ok=True) == torch.bfloat16
    assert precision.host_dtype("auto", cuda, fp16_ok=False) == torch.float32


def test_the_backends_implement_the_protocol(tiny_pipe):
    from headsup_core.backend import Backend

    assert isinstance(tiny_pipe.model, Backend)
    assert tiny_pipe.model.pixel_multiple % tiny_pipe.model.vae_scale == 0 and tiny_pipe.model.supports_exact_vae
    with pytest.raises(TypeError, match="unexpected keyword"):
        tiny_pipe.upscale(_rgb(8, 8), 2, colour_fix="none")
