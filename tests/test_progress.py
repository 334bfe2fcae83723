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
from headsup_core.planner import progress_units
from headsup_core.tiling import STAGES

STAGE_ENDS = {"encoder": lambda m: m.vae.encoder.conv_out, "unet": lambda m: m.unet.conv_out,
              "decoder": lambda m: m.vae.decoder.conv_out}


def _rgb(h, w, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def _one_tile_plan(pipe, hw=(48, 48)):
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
    plan = _one_tile_plan(tiny_pipe)
    assert all(plan.tile_ticks[s] == len(progress_units(tiny_pipe.model, s)) > 3 for s in STAGES)
    _, seen = _record(tiny_pipe, _rgb(48, 48), plan)
    assert [d for d, _, _ in seen] == list(range(1, plan.ticks_per_image() + 1))  # one at a time, to the total
    assert {t for _, t, _ in seen} == {plan.ticks_per_image()}
    for i, stage in enumerate(STAGES):
        # ticks while the stage runs: the earlier stages are done, this one's last conv has not run yet (with
        # them, the previous stage's last tick, given once its output was there)
        inside = [c for _, _, c in seen if c[:i] == (1,) * i and c[i] == 0]
        assert len(inside) == plan.tile_ticks[stage] - 1 + (i > 0) and len(inside) > 3, (stage, inside)


def test_ticks_leave_the_output_bit_for_bit_unchanged(tiny_pipe):
    image = _rgb(40, 56)
    for opts in (UpscaleOptions(scale=4), UpscaleOptions(scale=4, tile_size=64, vae_tiling="fast")):
        plan = tiny_pipe.plan((40, 56), opts)
        without = dataclasses.replace(plan, tile_ticks={s: 1 for s in STAGES})  # no hooks, one tick per tile
        ticked, seen = _record(tiny_pipe, image, plan)
        assert seen[-1][:2] == (plan.ticks_per_image(),) * 2 and plan.ticks_per_image() > without.ticks_per_image()
        assert np.array_equal(ticked, tiny_pipe.upscale(image, options=opts, plan=without))


def test_exact_tiles_spread_their_sub_steps_and_end_at_the_total(tiny_pipe):
    plan = tiny_pipe.plan((24, 32), UpscaleOptions(scale=4, tile_size=64, vae_tiling="exact"))
    assert len(plan.grid("decoder")) > 1 and plan.tile_ticks["decoder"] > 1
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
            tiny_pipe.upscale(_rgb(48, 48), options=plan.options, plan=plan, progress=stop)
    finally:
        later.remove()
    assert not ran_after  # stopped inside the stage, before its last conv
    units = [m for s in STAGES for m in progress_units(tiny_pipe.model, s)]
    assert not any(m._forward_hooks for m in units)  # the stage's hooks were removed on the way out


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
