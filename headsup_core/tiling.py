"""The tile grid of the three stages (VAE encoder, UNet, VAE decoder) and Gaussian-weighted blending over it.

All stages share one grid expressed in latent units: a stage reads its input tile at ``in_factor`` pixels per
latent unit and writes its output tile at ``out_factor`` (encoder 8 -> 1, UNet 1 -> 1, decoder 1 -> 8). A
``TilePlan`` says each stage's tile size, overlap and context; ``TilePlan.grid`` yields that stage's tiles (the
core each one writes and the window it reads), and the tiled runs (``run_tiled`` here, ``tiled_vae.run_exact``),
the memory estimate and the progress total all read them from there. The overlap and context rules are
``overlap_for`` and ``TilePlan.context``. Only one tile at a time lives on the compute device; when a single tile
covers the input, the stage runs once on the whole input, which is bit-identical to an untiled run.

Geometry layer: imports nothing from the package but ``geometry``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch

from .geometry import partition

ProgressFn = Callable[[], None]
STAGES = ("encoder", "unet", "decoder")


def overlap_for(stage: str, tile: int, cap: int | None = None) -> int:
    """The overlap of a ``tile``-latent tile of ``stage``: VAE an eighth of the tile, UNet a third, at least 2.
    ``cap`` (the memory planner's: 8 for the VAE, 32 for the UNet, whose overlap it also rounds down to a
    multiple of 8) bounds it."""
    if stage == "unet":
        if cap is None:
            return max(2, tile // 3)
        return max(2, min(cap, tile // 3 // 8 * 8 or tile // 3))
    return max(2, tile // 8 if cap is None else min(cap, tile // 8))


PLANNER_OVERLAP_CAP = {"encoder": 8, "unet": 32, "decoder": 8}


@dataclass(frozen=True)
class Tile:
    """One tile of a stage, in latent units: ``core`` (y0, y1, x0, x1) is what it writes (exact VAE: the cores
    partition the image; blended tiles: the whole tile, overlapping its neighbours), ``read`` the window it
    reads (the core and up to ``context`` units around it)."""
    core: tuple[int, int, int, int]
    read: tuple[int, int, int, int]

    @property
    def read_hw(self) -> tuple[int, int]:
        return self.read[1] - self.read[0], self.read[3] - self.read[2]

    def core_in(self, act: torch.Tensor) -> tuple[slice, slice]:
        """The core's slice of this tile's activation (any resolution: its scale is read off the shape)."""
        f = act.shape[-2] / (self.read[1] - self.read[0])
        y0, y1, x0, x1 = (round((c - r) * f) for c, r in zip(self.core, (self.read[0],) * 2 + (self.read[2],) * 2))
        return slice(y0, y1), slice(x0, x1)


def _window(y0, y1, x0, x1, h, w, context) -> Tile:
    return Tile((y0, y1, x0, x1), (max(0, y0 - context), min(h, y1 + context), max(0, x0 - context),
                                   min(w, x1 + context)))


def exact_grid(h: int, w: int, tile: int, context: int) -> list[Tile]:
    """Cores partitioning h x w into nearly equal parts of at most ``tile``, each read with ``context`` around."""
    return [_window(cy[0], cy[1], cx[0], cx[1], h, w, context)
            for cy in partition(h, tile) for cx in partition(w, tile)]


def blend_grid(h: int, w: int, tile: int, overlap: int, context: int = 0) -> list[Tile]:
    """Overlapping tiles (``fit_tile`` sized, evenly spread), row by row, each read with ``context`` around."""
    th, tw = fit_tile(h, tile, overlap), fit_tile(w, tile, overlap)
    return [_window(y, y + th, x, x + tw, h, w, context)
            for y in tile_starts(h, th, overlap) for x in tile_starts(w, tw, overlap)]


@dataclass(frozen=True)
class TilePlan:
    """Tile sizes and overlaps, in latent units (1 latent unit = ``vae_scale`` output pixels).

    ``vae_mode`` "exact" (default): VAE tiles partition the image, read ``*_context`` latent units around
    themselves and share whole-image GroupNorm statistics pooled over all tiles (``tiled_vae.py``); the
    overlaps then apply to the UNet only. "fast": overlapping blended VAE tiles with statistics estimated on a
    small preview (cheaper, less exact; see docs/benchmark.md). The device defaults are planner.py's.
    """
    encoder_tile: int = 128
    encoder_overlap: int = 8
    unet_tile: int = 96
    unet_overlap: int = 32
    decoder_tile: int = 128
    decoder_overlap: int = 8
    encoder_context: int = 8   # 64 px (OSEDiff's tiled VAE pads encoder tiles by 32 px)
    decoder_context: int = 11  # as OSEDiff's tiled VAE
    vae_mode: str = "exact"

    @classmethod
    def from_tile_size(cls, tile_size: int, vae_scale: int = 8) -> "TilePlan":
        """One user-facing knob: the tile edge in output pixels drives every stage."""
        t = max(8, int(tile_size) // vae_scale // 8 * 8)  # multiples of 8 latents fit the UNet's downsamplings
        return cls(encoder_tile=t, encoder_overlap=overlap_for("encoder", t), unet_tile=t,
                   unet_overlap=overlap_for("unet", t), decoder_tile=t, decoder_overlap=overlap_for("decoder", t))

    def tile(self, stage: str) -> int:
        return {"encoder": self.encoder_tile, "unet": self.unet_tile, "decoder": self.decoder_tile}[stage]

    def overlap(self, stage: str) -> int:
        return {"encoder": self.encoder_overlap, "unet": self.unet_overlap, "decoder": self.decoder_overlap}[stage]

    def with_tile(self, stage: str, tile: int, cap: int | None = None) -> "TilePlan":
        """This plan with ``stage``'s tile set to ``tile`` and its overlap from ``overlap_for``."""
        return dataclasses.replace(self, **{f"{stage}_tile": tile, f"{stage}_overlap": overlap_for(stage, tile, cap)})

    def exact(self, stage: str) -> bool:
        """Whether ``stage`` runs as exact lockstep tiles (a VAE stage in exact mode)."""
        return stage != "unet" and self.vae_mode == "exact"

    def context(self, stage: str) -> int:
        """Latent units each tile of ``stage`` reads around itself: the exact VAE's contexts; blended VAE tiles
        read their encoder overlap / half their decoder overlap; the UNet reads none."""
        if stage == "unet":
            return 0
        if self.exact(stage):
            return self.encoder_context if stage == "encoder" else self.decoder_context
        return self.encoder_overlap if stage == "encoder" else self.decoder_overlap // 2

    def grid(self, stage: str, latent_hw: tuple[int, int]) -> list[Tile]:
        """Every tile ``stage`` computes on a ``latent_hw`` latent grid (one tile: the stage runs untiled)."""
        h, w = latent_hw
        if self.exact(stage):
            return exact_grid(h, w, self.tile(stage), self.context(stage))
        return blend_grid(h, w, self.tile(stage), self.overlap(stage), self.context(stage))

    def tile_count(self, stage: str, latent_hw: tuple[int, int]) -> int:
        return len(self.grid(stage, latent_hw))

    def halved(self, min_tile: int = 8) -> "TilePlan | None":
        """Every stage's tile halved (multiples of 8 latents, at least ``min_tile``; overlaps never grow past the
        ``overlap_for`` of the new tile), for the out-of-memory retry; None when every tile is at the minimum."""
        def half(t: int) -> int:
            return max(min_tile, t // 2 // 8 * 8)

        tiles = {s: half(self.tile(s)) for s in STAGES}
        if all(tiles[s] == self.tile(s) for s in STAGES):
            return None
        fields = {}
        for s in STAGES:
            fields[f"{s}_tile"] = tiles[s]
            fields[f"{s}_overlap"] = min(self.overlap(s), overlap_for(s, tiles[s]))
        return dataclasses.replace(self, **fields)

    def describe(self) -> str:
        return (f"encoder {self.encoder_tile}, UNet {self.unet_tile}/{self.unet_overlap}, decoder "
                f"{self.decoder_tile} latents ({self.vae_mode} VAE tiles)")


def fit_tile(length: int, tile: int, overlap: int, multiple: int = 8) -> int:
    """The smallest tile (a multiple of ``multiple``, at most ``tile``) that covers ``length`` with as few tiles
    as ``tile`` would need: 128 latents with 64-tiles become 3 tiles of 48, not 3 of 64 (2.25x the work)."""
    if length <= tile:
        return length
    count = math.ceil((length - overlap) / max(1, tile - overlap))
    fitted = math.ceil((length + (count - 1) * overlap) / count)
    return min(tile, max(overlap + multiple, math.ceil(fitted / multiple) * multiple))


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering ``length`` with tiles of ``tile`` overlapping by at least ``overlap``."""
    if length <= tile:
        return [0]
    stride = max(1, tile - overlap)
    count = math.ceil((length - tile) / stride) + 1
    # Spread the tiles evenly so every overlap is about the same width (no thin last strip).
    return sorted({round(i * (length - tile) / (count - 1)) for i in range(count)})


def gaussian_weights(h: int, w: int, device=None, var: float = 0.01) -> torch.Tensor:
    """OSEDiff's separable Gaussian tile weights (variance 0.01 of the tile size), shape 1x1xhxw."""
    def axis(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float64, device=device)
        mid = (n - 1) / 2
        return torch.exp(-((x - mid) ** 2) / (n * n) / (2 * var))
    return (axis(h)[:, None] * axis(w)[None, :]).float()[None, None]


def run_tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, in_factor: int, out_factor: int,
              out_channels: int, compute_device: torch.device, grid: list[Tile] | None = None, tile: int = 0,
              overlap: int = 0, context: int = 0, out_device: torch.device | None = None,
              progress: ProgressFn | None = None, skip: Callable[[torch.Tensor], bool] | None = None,
              norm_sync: torch.nn.Module | None = None, preview_side: int = 32) -> torch.Tensor:
    """Apply ``fn`` over ``x`` (1xCxHxW, H and W multiples of ``in_factor``) tile by tile and blend.

    The tiles are ``grid`` (a plan's ``TilePlan.grid``: blended tiles of one size), else ``blend_grid`` of
    ``tile``/``overlap``/``context``. Each tile reads its window (``context`` latent units around it, so tile
    borders do not see zero padding: the VAE's receptive field is wide) and its output is cropped to the tile.
    ``skip(tile_input)`` may return True for tiles whose output is known to be zero (e.g. an empty reference
    canvas); they are not computed. With ``norm_sync`` (the VAE), GroupNorm statistics come from a preview of
    the whole input whose longer side is ``preview_side`` latent units (see ``GroupNormSync``).
    """
    out_device = out_device or x.device
    h, w = x.shape[-2] // in_factor, x.shape[-1] // in_factor
    tiles = grid if grid is not None else blend_grid(h, w, tile, overlap, context)
    if len(tiles) == 1:
        if skip is not None and skip(x):
            out = torch.zeros(1, out_channels, h * out_factor, w * out_factor, device=out_device)
        else:
            out = fn(x.to(compute_device)).float().to(out_device)
        if progress:
            progress()
        return out
    sync = contextlib.nullcontext()
    if norm_sync is not None:
        sync = GroupNormSync(norm_sync)
        sync.record(fn, preview_of(x, preview_side * in_factor, in_factor).to(compute_device))
    with sync:
        return _blend_tiles(fn, x, tiles, in_factor, out_factor, out_channels, compute_device, out_device, progress,
                            skip)


def _blend_tiles(fn, x, tiles, in_factor, out_factor, out_channels, compute_device, out_device, progress, skip):
    h, w = x.shape[-2] // in_factor, x.shape[-1] // in_factor
    out = torch.zeros(1, out_channels, h * out_factor, w * out_factor, device=out_device)
    weight_sum = torch.zeros(1, 1, h * out_factor, w * out_factor, device=out_device)
    c = tiles[0].core
    th, tw = c[1] - c[0], c[3] - c[2]
    weights = gaussian_weights(th * out_factor, tw * out_factor, device=out_device)
    for t in tiles:
        (y, _, x0, _), (y0, y1, x1, x2) = t.core, t.read
        inp = x[..., y0 * in_factor:y1 * in_factor, x1 * in_factor:x2 * in_factor]
        oy, ox = slice(y * out_factor, (y + th) * out_factor), slice(x0 * out_factor, (x0 + tw) * out_factor)
        if skip is None or not skip(inp):
            res = fn(inp.to(compute_device)).float().to(out_device)
            cy, cx = (y - y0) * out_factor, (x0 - x1) * out_factor
            res = res[..., cy:cy + th * out_factor, cx:cx + tw * out_factor]
            out[..., oy, ox] += res * weights
        weight_sum[..., oy, ox] += weights
        if progress:
            progress()
    return out.div_(weight_sum)


class GroupNormSync:
    """Share GroupNorm statistics across VAE tiles: the opt-in "fast" mode (the exact default is tiled_vae.py).

    Per-tile GroupNorm statistics differ from the whole image's, which shows as colour/brightness steps between
    tiles. Statistics are recorded once on a small preview of the whole input and reused by every tile, so all
    tiles are normalised alike. The preview costs one small forward pass.
    """

    def __init__(self, module: torch.nn.Module):
        self.norms = [m for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]
        self.stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(self, fn: Callable[[torch.Tensor], torch.Tensor], preview: torch.Tensor) -> None:
        def hook(module, args):
            x = args[0].float()
            g = x.reshape(x.shape[0], module.num_groups, -1)
            self.stats[id(module)] = (g.mean(-1, keepdim=True), g.var(-1, unbiased=False, keepdim=True))

        handles = [m.register_forward_pre_hook(hook) for m in self.norms]
        try:
            fn(preview)
        finally:
            for h in handles:
                h.remove()

    def _forward(self, module):
        mean, var = self.stats[id(module)]

        def forward(x):
            b = x.shape[0]
            g = x.float().reshape(b, module.num_groups, -1)
            g = (g - mean.to(g.device)) / torch.sqrt(var.to(g.device) + module.eps)
            y = g.reshape(x.shape)
            if module.affine:
                shape = (1, -1) + (1,) * (x.ndim - 2)
                y = y * module.weight.float().reshape(shape) + module.bias.float().reshape(shape)
            return y.to(x.dtype)
        return forward

    def __enter__(self):
        for m in self.norms:
            if id(m) in self.stats:
                m.forward = self._forward(m)
        return self

    def __exit__(self, *exc):
        for m in self.norms:
            m.__dict__.pop("forward", None)
        return False


def preview_of(x: torch.Tensor, max_side: int, multiple: int) -> torch.Tensor:
    """Area-downscale ``x`` so its longer side is about ``max_side`` (a multiple of ``multiple``)."""
    h, w = x.shape[-2:]
    f = min(1.0, max_side / max(h, w))
    ph, pw = max(multiple, round(h * f / multiple) * multiple), max(multiple, round(w * f / multiple) * multiple)
    if (ph, pw) == (h, w):
        return x
    small = torch.nn.functional.interpolate(x.float(), size=(ph, pw), mode="area")
    # Averaging lowers the spread the statistics see: re-match the preview's per-channel mean and std to the
    # full input's (the fast mode of OSEDiff's tiled VAE does the same).
    std, mean = torch.std_mean(x.float(), dim=(0, 2, 3), keepdim=True)
    s_std, s_mean = torch.std_mean(small, dim=(0, 2, 3), keepdim=True)
    small = (small - s_mean) / s_std.clamp_min(1e-6) * std + mean
    return small.clamp_(float(x.min()), float(x.max()))
