"""The three stages of one image on a plan's tile grid: VAE encode, the one-step UNet, VAE decode.

Each stage reads its tiles from the plan (``TilePlan.grid``): exact lockstep VAE tiles (tiled_vae.py) where the
plan says "exact" and the stage has more than one tile, else blended tiles (tiling.run_tiled), which for one
tile is the plain untiled forward. The backend (backend.py) does the maths and its own fp32 retry.

Progress: each stage gives exactly its share of the plan's total (``Plan.stage_ticks``), ``StageTicks``: inside a
blended / untiled tile one tick as each progress unit (a resnet, sampler or attention block) ends, observed by
forward hooks that change nothing; exact lockstep tiles spread theirs over the lockstep steps.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from . import tiled_vae
from .errors import InterruptedByUser
from .planner import Plan, progress_units
from .tiling import run_tiled

# Longer side, in latent units, of the whole-image previews that give tiled VAE stages shared GroupNorm statistics.
ENCODER_PREVIEW = 64
DECODER_PREVIEW = 32
CPU = torch.device("cpu")


class Progress:
    """Counts tiles for ``progress(done, total)`` and polls ``interrupt()`` after each. ``extend`` adds work
    found during the run (a reference's face windows), so every tick is a tile that really ran."""

    def __init__(self, total: int, progress: Callable[[int, int], Any] | None = None,
                 interrupt: Callable[[], bool] | None = None):
        self.done, self.total = 0, total
        self._progress, self._interrupt = progress, interrupt

    def extend(self, tiles: int) -> None:
        self.total += tiles

    def tick(self) -> None:
        self.done += 1
        if self._progress is not None:
            self._progress(self.done, self.total)
        if self._interrupt is not None and self._interrupt():
            raise InterruptedByUser("Interrupted by the user.")


class StageTicks:
    """One stage's share of the progress: ``tiles * per_tile`` ticks, ``per_tile`` per tile. Within a tile one
    tick comes as each of ``units`` finishes its forward (hooks registered while the stage runs), the rest when
    the tile is done (``tile_done``). Capped, so a forward that runs again (the fp32 retry, the fast VAE's
    preview) never ticks past the stage's share; ``finish`` gives what is left. Every tick is an interrupt point."""

    def __init__(self, tick: Callable[[], None], tiles: int, per_tile: int, units=()):
        self._tick, self.per_tile = tick, per_tile
        self.left, self.inside = tiles * per_tile, 0
        self._units = list(units) if per_tile > 1 else []
        self._handles: list = []

    @classmethod
    def of(cls, model, plan: Plan, stage: str, tick, tiles: int, hooks: bool = True) -> "StageTicks":
        per_tile = plan.tile_ticks[stage]
        return cls(tick, tiles, per_tile, progress_units(model, stage) if hooks and per_tile > 1 else ())

    def __enter__(self) -> "StageTicks":
        self._handles = [m.register_forward_hook(self._unit_done) for m in self._units]
        return self

    def __exit__(self, *exc) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return False

    def give(self) -> None:
        if self.left > 0:
            self.left -= 1
            self._tick()

    def _unit_done(self, *_) -> None:
        if self.inside < self.per_tile - 1:  # the tile's last tick waits for the tile's output
            self.inside += 1
            self.give()

    def tile_done(self) -> None:
        for _ in range(self.per_tile - self.inside):
            self.give()
        self.inside = 0

    def finish(self) -> None:
        while self.left > 0:
            self.give()


def _is_empty(t: torch.Tensor) -> bool:
    return not bool(t.abs().amax() > 0)


def encode_tiles(model, x: torch.Tensor, plan: Plan) -> int:
    """How many tiles ``encode`` runs on ``x`` (its progress ticks)."""
    s = model.vae_scale
    return len(plan.tiles.grid("encoder", (x.shape[-2] // s, x.shape[-1] // s)))


def encode(model, x: torch.Tensor, plan: Plan, tick: Callable[[], None], generator=None, *,
           to_unit: bool = False) -> torch.Tensor:
    """Tiled VAE encode of an image in [0, 1] (``to_unit``: mapped to [-1, 1] per tile, so no second full-size
    copy is made) or in [-1, 1] -> scaled latent, on the model's device. An all-zero [-1, 1] input (an empty
    reference canvas) encodes to zeros without running the VAE."""
    dev, s = model.device, model.vae_scale
    latent_hw = (x.shape[-2] // s, x.shape[-1] // s)
    grid = plan.tiles.grid("encoder", latent_hw)
    exact = plan.tiles.exact("encoder") and len(grid) > 1
    if not to_unit and _is_empty(x):  # cheap test first: the image itself is never scanned
        with StageTicks.of(model, plan, "encoder", tick, len(grid), hooks=False) as ticks:
            ticks.finish()
        return torch.zeros(1, 4, *latent_hw, device=dev)
    with StageTicks.of(model, plan, "encoder", tick, len(grid), hooks=not exact) as ticks:
        if exact:
            def fwd(vae, t, park):
                t = t.to(model.compute_dtype("encoder"))
                return tiled_vae.encoder_forward(vae, t * 2 - 1 if to_unit else t, park)

            def run():
                return tiled_vae.run_exact(fwd, model.vae, x, grid=grid, in_factor=s, out_factor=1,
                                           compute_device=dev, out_device=dev, progress=ticks.give, ticks=ticks.left,
                                           ram_budget=plan.parking_budget["encoder"])
            moments = model.fp32_retry("encoder", run, "it")()
            ticks.finish()
            return model.latent_from_moments(moments, generator)
        enc = model.fp32_retry("encoder", lambda t: model.encode(t * 2 - 1 if to_unit else t, generator))
        out = run_tiled(enc, x, grid=grid, in_factor=s, out_factor=1, out_channels=4, compute_device=dev,
                        out_device=dev, progress=ticks.tile_done, skip=None if to_unit else _is_empty,
                        norm_sync=model.vae.encoder, preview_side=ENCODER_PREVIEW)
        ticks.finish()
        return out


def predict(model, unet_in: torch.Tensor, embeds: torch.Tensor, strength: float, plan: Plan,
            tick: Callable[[], None]) -> torch.Tensor:
    """The one step over the UNet's tiles: conditioning-assembled latent -> x0 latent."""
    step = model.fp32_retry("unet", lambda t: model.predict_x0(t, t[:, :4], embeds, strength))
    dev, grid = model.device, plan.grid("unet")
    with StageTicks.of(model, plan, "unet", tick, len(grid)) as ticks:
        out = run_tiled(step, unet_in, grid=grid, in_factor=1, out_factor=1, out_channels=4, compute_device=dev,
                        out_device=dev, progress=ticks.tile_done)
        ticks.finish()
    return out


def decode(model, x0: torch.Tensor, plan: Plan, tick: Callable[[], None]) -> torch.Tensor:
    """Tiled VAE decode of a scaled latent -> image in [-1, 1] on the CPU."""
    dev, s = model.device, model.vae_scale
    grid = plan.tiles.grid("decoder", tuple(x0.shape[-2:]))
    exact = plan.tiles.exact("decoder") and len(grid) > 1
    with StageTicks.of(model, plan, "decoder", tick, len(grid), hooks=not exact) as ticks:
        if exact:
            def fwd(vae, t, park):
                return tiled_vae.decoder_forward(vae, t.to(model.compute_dtype("decoder")) / model.scaling_factor,
                                                 park)

            def run():
                return tiled_vae.run_exact(fwd, model.vae, x0, grid=grid, in_factor=1, out_factor=s,
                                           compute_device=dev, out_device=CPU, progress=ticks.give, ticks=ticks.left,
                                           ram_budget=plan.parking_budget["decoder"])
            out = model.fp32_retry("decoder", run, "it")().clamp_(-1, 1)
        else:
            dec = model.fp32_retry("decoder", model.decode)
            out = run_tiled(dec, x0, grid=grid, in_factor=1, out_factor=s, out_channels=3, compute_device=dev,
                            out_device=CPU, progress=ticks.tile_done, norm_sync=model.vae.decoder,
                            preview_side=DECODER_PREVIEW)
        ticks.finish()
    return out
