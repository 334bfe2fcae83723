"""The three stages of one image on a plan's tile grid: VAE encode, the one-step UNet, VAE decode.

Each stage reads its tiles from the plan (``TilePlan.grid``): exact lockstep VAE tiles (tiled_vae.py) where the
plan says "exact" and the stage has more than one tile, else blended tiles (tiling.run_tiled), which for one
tile is the plain untiled forward. The backend (backend.py) does the maths and its own fp32 retry.

Progress: each stage gives exactly its share of the plan's total (``Plan.stage_ticks``), ``StageTicks``: inside a
blended / untiled tile one tick as each progress unit (a resnet, sampler or attention block) ends, observed by
forward hooks that change nothing, and on a CPU one per query chunk of the VAE's global attention
(``ChunkedAttention``, the same bits); exact lockstep tiles spread theirs over the lockstep steps.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import tiled_vae
from .errors import InterruptedByUser
from .planner import Plan, attention_chunks, chunked_attentions, progress_units
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
    """One stage's share of the progress: ``sum(counts)`` ticks, ``counts[i]`` for its i-th tile. Within a tile
    one tick comes as each of ``units`` finishes its forward (hooks registered while the stage runs) or a chunk
    of a chunked attention ends, the rest when the tile is done (``tile_done``). Capped, so a forward that runs
    again (the fp32 retry, the fast VAE's preview) never ticks past the stage's share; ``finish`` gives what is
    left. Every tick is an interrupt point."""

    def __init__(self, tick: Callable[[], None], counts: list[int], units=()):
        self._tick, self._counts, self._tile = tick, list(counts), 0
        self.left, self.inside = sum(counts), 0
        self._units = list(units) if max(counts, default=1) > 1 else []
        self._chunked: list = []  # attentions run by ChunkedAttention while the stage runs (a CPU's)
        self._handles: list = []
        self._processors: list = []

    @classmethod
    def of(cls, model, plan: Plan, stage: str, tick, grid, hooks: bool = True) -> "StageTicks":
        """``stage``'s ticks over ``grid`` as the plan counts them; ``hooks``: tick inside the tiles (a blended
        or untiled run; exact lockstep tiles spread theirs instead)."""
        units, attentions = plan.tick_sources[stage]
        units = progress_units(model, stage) if hooks and units else ()
        ticks = cls(tick, [plan.tile_ticks(stage, t) for t in grid], units)
        if hooks and attentions:
            ticks._chunked = chunked_attentions(model, stage)
        return ticks

    def __enter__(self) -> "StageTicks":
        self._handles = [m.register_forward_hook(self._unit_done) for m in self._units]
        self._processors = [(m, m.processor) for m in self._chunked]
        for attn, original in self._processors:
            attn.processor = ChunkedAttention(original, self._unit_done)
        return self

    def __exit__(self, *exc) -> bool:
        for handle in self._handles:
            handle.remove()
        for attn, original in self._processors:
            attn.processor = original
        self._handles, self._processors = [], []
        return False

    def give(self) -> None:
        if self.left > 0:
            self.left -= 1
            self._tick()

    def _per_tile(self) -> int:
        return self._counts[min(self._tile, len(self._counts) - 1)] if self._counts else 1

    def _unit_done(self, *_) -> None:
        if self.inside < self._per_tile() - 1:  # the tile's last tick waits for the tile's output
            self.inside += 1
            self.give()

    def tile_done(self) -> None:
        for _ in range(self._per_tile() - self.inside):
            self.give()
        self.inside, self._tile = 0, self._tile + 1

    def finish(self) -> None:
        while self.left > 0:
            self.give()


class ChunkedAttention:
    """diffusers' ``AttnProcessor2_0`` for a VAE's self-attention (its steps, in its order) with the queries in
    chunks (``attention_chunks``) and ``on_chunk()`` after each but the last: a progress tick and interrupt point
    inside the one call that takes most of a large untiled VAE stage on a CPU. Every query attends to all keys
    alone, in the same blocks, so the chunks give the same bits (tests/test_progress.py checks it); a small
    attention runs whole (its ticks come when the tile ends); other calls go to ``original``."""

    def __init__(self, original, on_chunk: Callable[[], None]):
        self.original, self.on_chunk = original, on_chunk

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if (encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 4
                or attn.norm_q is not None or attn.norm_k is not None or args or kwargs):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        batch, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        out = query.new_empty(query.shape)
        bounds = attention_chunks(query.shape[2])
        for i, (start, end) in enumerate(bounds):
            out[:, :, start:end] = F.scaled_dot_product_attention(query[:, :, start:end], key, value,
                                                                  attn_mask=None, dropout_p=0.0, is_causal=False)
            if i + 1 < len(bounds):
                self.on_chunk()
        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


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
        with StageTicks.of(model, plan, "encoder", tick, grid, hooks=False) as ticks:
            ticks.finish()
        return torch.zeros(1, 4, *latent_hw, device=dev)
    with StageTicks.of(model, plan, "encoder", tick, grid, hooks=not exact) as ticks:
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
    with StageTicks.of(model, plan, "unet", tick, grid) as ticks:
        out = run_tiled(step, unet_in, grid=grid, in_factor=1, out_factor=1, out_channels=4, compute_device=dev,
                        out_device=dev, progress=ticks.tile_done)
        ticks.finish()
    return out


def decode(model, x0: torch.Tensor, plan: Plan, tick: Callable[[], None]) -> torch.Tensor:
    """Tiled VAE decode of a scaled latent -> image in [-1, 1] on the CPU."""
    dev, s = model.device, model.vae_scale
    grid = plan.tiles.grid("decoder", tuple(x0.shape[-2:]))
    exact = plan.tiles.exact("decoder") and len(grid) > 1
    with StageTicks.of(model, plan, "decoder", tick, grid, hooks=not exact) as ticks:
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
