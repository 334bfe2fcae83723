"""Progress inside long stages (issue 25): a stage that runs as one forward ticks as each of its resnets,
samplers and attention blocks ends; the total is the plan's and exact; an interrupt at such a tick stops the
run (library, CLI, ComfyUI); the hooks that give the ticks leave the output bit for bit as it was."""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from headsup_core.errors import InterruptedByUser
from headsup_core.options import UpscaleOptions
from headsup_core.planner import (
    ATTENTION_CHUNKS,
    attention_chunks,
    chunked_attentions,
    progress_units,
)
from headsup_core.stages import ChunkedAttention
from headsup_core.tiling import STAGES

STAGE_ENDS = {"encoder": lambda m: m.vae.encoder.conv_out, "unet": lambda m: m.unet.conv_out,
              "decoder": lambda m: m.vae.decoder.conv_out}


def _rgb(h, w, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def _one_tile_plan(pipe, hw=(96, 96)):
    plan = pipe.plan(hw, UpscaleOptions(scale=4))
    assert all(len(plan.grid(s)) == 1 for s in STAGES), plan.describe()  # every stage runs as one forward
    return plan


def _record(pipe, image, plan, **kw):
    """Run with a progress callback that notes, per tick, how many times each stage's last conv has run."""
    ends = {s: 0 for s in STAGES}
    hooks = [STAGE_ENDS[s](pipe.model).register_forward_hook(lambda *a, s=s: ends.__setitem__(s, ends[s] + 1))
             for s in STAGES]
    seen = []
    try:
        out = pipe.upscale(image, options=plan.options, plan=plan,
                           progress=lambda d, t: seen.append((d, t, tuple(ends[s] for s in STAGES))), **kw)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


def test_one_tile_stages_tick_inside_and_end_at_the_total(tiny_pipe):
    plan = _one_tile_plan(tiny_pipe)  # a 48x48 latent: the VAE's mid-block attention runs in two query chunks
    per_tile = {s: plan.tile_ticks(s, plan.grid(s)[0]) for s in STAGES}
    chunks = {s: len(chunked_attentions(tiny_pipe.model, s)) for s in STAGES}
    assert chunks == {"encoder": 1, "unet": 0, "decoder": 1} and len(attention_chunks(48 * 48)) == 2
    assert all(per_tile[s] == len(progress_units(tiny_pipe.model, s)) + chunks[s] > 3 for s in STAGES)
    _, seen = _record(tiny_pipe, _rgb(96, 96), plan)
    assert [d for d, _, _ in seen] == list(range(1, plan.ticks_per_image() + 1))  # one at a time, to the total
    assert {t for _, t, _ in seen} == {plan.ticks_per_image()}
    for i, stage in enumerate(STAGES):
        # ticks while the stage runs: the earlier stages are done, this one's last conv has not run yet (with
        # them, the previous stage's last tick, given once its output was there)
        inside = [c for _, _, c in seen if c[:i] == (1,) * i and c[i] == 0]
        assert len(inside) == per_tile[stage] - 1 + (i > 0) and len(inside) > 3, (stage, inside)


def test_ticks_leave_the_output_bit_for_bit_unchanged(tiny_pipe):
    image = _rgb(96, 120)  # untiled: a 48x60 latent, whose VAE attention runs in two query chunks
    for opts in (UpscaleOptions(scale=4), UpscaleOptions(scale=4, tile_size=256, vae_tiling="fast")):
        plan = tiny_pipe.plan((96, 120), opts)
        without = dataclasses.replace(plan, tick_sources={s: (0, 0) for s in STAGES})  # one tick per tile
        ticked, seen = _record(tiny_pipe, image, plan)
        assert seen[-1][:2] == (plan.ticks_per_image(),) * 2 and plan.ticks_per_image() > without.ticks_per_image()
        assert np.array_equal(ticked, tiny_pipe.upscale(image, options=opts, plan=without))


def test_exact_tiles_spread_their_sub_steps_and_end_at_the_total(tiny_pipe):
    plan = tiny_pipe.plan((24, 32), UpscaleOptions(scale=4, tile_size=64, vae_tiling="exact"))
    assert len(plan.grid("decoder")) > 1 and plan.tick_sources["decoder"][0] > 1
    _, seen = _record(tiny_pipe, _rgb(24, 32), plan)
    assert [d for d, _, _ in seen] == list(range(1, plan.ticks_per_image() + 1))
    decoding = [c for _, _, c in seen if c[1] == len(plan.grid("unet")) and c[2] == 0]
    assert len(decoding) > len(plan.grid("decoder"))  # more than one tick per tile, during the stage


@pytest.mark.parametrize("stage", STAGES)
def test_an_interrupt_inside_a_one_tile_stage_stops_the_run(tiny_pipe, stage):
    plan = _one_tile_plan(tiny_pipe)
    first = sum(plan.stage_ticks(s) for s in STAGES[:STAGES.index(stage)]) + 2  # this stage's second tick
    ran_after = []
    later = STAGE_ENDS[stage](tiny_pipe.model).register_forward_hook(lambda *a: ran_after.append(1))

    def stop(done, total):
        if done == first:
            raise InterruptedByUser("stopped")
    try:
        with pytest.raises(InterruptedByUser):
            tiny_pipe.upscale(_rgb(96, 96), options=plan.options, plan=plan, progress=stop)
    finally:
        later.remove()
    assert not ran_after  # stopped inside the stage, before its last conv
    units = [m for s in STAGES for m in progress_units(tiny_pipe.model, s)]
    assert not any(m._forward_hooks for m in units)  # the stage's hooks were removed on the way out
    assert not any(isinstance(m.processor, ChunkedAttention) for m in units if hasattr(m, "processor"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_attention_gives_the_same_bits(dtype):
    """An SD-size VAE mid-block attention (512 channels, 32 groups), channels-last as on the CPU."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(512, heads=1, dim_head=512, norm_num_groups=32, residual_connection=True, bias=True,
                     upcast_softmax=True, _from_deprecated_attn_block=True).eval().to(dtype)
    assert type(attn.processor) is AttnProcessor2_0
    x = torch.randn(1, 512, 64, 73, dtype=dtype).contiguous(memory_format=torch.channels_last)
    chunks = []
    with torch.no_grad():
        plain = attn(x)
        attn.processor = ChunkedAttention(attn.processor, lambda: chunks.append(1))
        chunked = attn(x)
    assert attention_chunks(64 * 73)[-1] == (3 * 1024, 64 * 73)  # 4 chunks, the last one longer
    assert torch.equal(plain, chunked) and len(chunks) == 3


def test_attention_chunks_cover_the_tokens_in_aligned_ranges():
    assert attention_chunks(2047) == [(0, 2047)]  # small: whole
    for tokens in (2048, 5000, 284160):
        bounds = attention_chunks(tokens)
        assert bounds[0][0] == 0 and bounds[-1][1] == tokens and 2 <= len(bounds) <= ATTENTION_CHUNKS
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert all(s % 256 == 0 and e - s >= 1024 for s, e in bounds)


def test_an_interrupt_inside_the_vae_attention_stops_there(tiny_pipe):
    plan = _one_tile_plan(tiny_pipe)
    (attn,) = chunked_attentions(tiny_pipe.model, "encoder")
    original, state = attn.processor, {"q": 0, "out": 0}
    hooks = [attn.to_q.register_forward_hook(lambda *a: state.__setitem__("q", state["q"] + 1)),
             attn.to_out[0].register_forward_hook(lambda *a: state.__setitem__("out", state["out"] + 1))]

    def stop(done, total):
        if state["q"] and not state["out"]:  # a tick between the attention's first and last query chunk
            raise InterruptedByUser("stopped")
    try:
        with pytest.raises(InterruptedByUser):
            tiny_pipe.upscale(_rgb(96, 96), options=plan.options, plan=plan, progress=stop)
    finally:
        for h in hooks:
            h.remove()
    assert state == {"q": 1, "out": 0} and attn.processor is original


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_cli_signal_at_a_tick_inside_a_stage_exits_with_nothing_written(tmp_path, tiny_models, monkeypatch,
                                                                          capsys, signum):
    from headsup_core.cli import main
    from headsup_core.pipeline import HeadsUpPipeline

    real, seen = HeadsUpPipeline.upscale, []

    def upscale(self, image, *args, progress=None, plan=None, **kwargs):
        assert plan is not None and all(len(plan.grid(s)) == 1 for s in STAGES)  # one forward per stage

        def tick(done, total):
            seen.append((done, total))
            if done == 2:  # inside the encoder's one forward
                os.kill(os.getpid(), signum)
            progress(done, total)
        return real(self, image, *args, progress=tick, plan=plan, **kwargs)

    monkeypatch.setattr(HeadsUpPipeline, "upscale", upscale)
    monkeypatch.setenv("HEADSUP_SPILL_DIR", str(tmp_path))
    src, out = tmp_path / "in.png", tmp_path / "out" / "o.png"
    Image.new("RGB", (32, 32), (90, 80, 70)).save(src)
    code = main(["upscale", str(src), "-o", str(out), "--scale", "2", "-q", "--faces", "none",
                 "--base", str(tiny_models["base_single"]), "--weights", str(tiny_models["headsup"])])
    assert code == 128 + signum and seen[-1][0] == 2 < seen[-1][1], seen
    assert "Traceback" not in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


@pytest.fixture(scope="module")
def pack(tiny_models, tmp_path_factory):
    stub = str(Path(__file__).parent / "comfy_stub")
    sys.path.insert(0, stub)
    import harness

    sys.path.remove(stub)
    models = tmp_path_factory.mktemp("models")
    for sub in ("headsup", "checkpoints", "diffusers"):
        (models / sub).mkdir()
    os.symlink(tiny_models["headsup"], models / "headsup" / "headsup.safetensors")
    os.symlink(tiny_models["base"], models / "diffusers" / "base", target_is_directory=True)
    yield harness.load_pack(models)
    harness.unload()


def test_comfyui_progress_bar_is_monotone_and_ends_at_the_total(pack):
    model = pack.nodes["HeadsUpLoader"].execute(weights="headsup.safetensors", base="diffusers/base",
                                                dtype="auto")[0]
    plan = _one_tile_plan(model.pipe, (12, 20))
    pack.utils.UPDATES.clear()
    image, _ = pack.nodes["HeadsUpUpscale"].execute(model=model, image=torch.rand(1, 12, 20, 3), scale=4.0,
                                                     tile_size=0, color_fix="none").result
    assert image.shape == (1, 48, 80, 3)
    values = [v for v, _ in pack.utils.UPDATES]
    assert values == sorted(values) and len(values) == plan.ticks_per_image() > len(STAGES)
    assert pack.utils.UPDATES[-1] == (plan.ticks_per_image(), plan.ticks_per_image())
