"""Tiled execution of the three stages (VAE encoder, UNet, VAE decoder) with Gaussian-weighted blending.

All stages share one grid expressed in latent units: a stage reads its input tile at ``in_factor`` pixels per
latent unit and writes its output tile at ``out_factor`` (encoder 8 -> 1, UNet 1 -> 1, decoder 1 -> 8). Only
one tile at a time lives on the compute device; outputs are accumulated into image-sized buffers on the
storage device, so peak compute memory depends on the tile size and not on the image size. When a single tile
covers the input, the stage runs once on the whole input, which is bit-identical to an untiled run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch

ProgressFn = Callable[[], None]


@dataclass(frozen=True)
class TilePlan:
    """Tile sizes and overlaps, in latent units (1 latent unit = ``vae_scale`` output pixels).

    ``vae_mode`` "exact" (default): VAE tiles partition the image, read ``*_context`` latent units around
    themselves and share whole-image GroupNorm statistics pooled over all tiles (``tiled_vae.py``); the
    overlaps then apply to the UNet only. "fast": overlapping blended VAE tiles with statistics estimated on a
    small preview (cheaper, less exact; see docs/benchmark.md).
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
    def for_device(cls, device: torch.device | str) -> "TilePlan":
        kind = torch.device(device).type
        if kind == "cpu":
            # The VAE dominates on CPU and every overlap is recomputed: fewer, larger VAE tiles (see
            # docs/benchmark.md); the UNet keeps OSEDiff's 96/32.
            return cls(encoder_tile=128, encoder_overlap=8, unet_tile=96, unet_overlap=32, decoder_tile=96,
                       decoder_overlap=8)
        from .devices import total_memory_bytes

        gib = total_memory_bytes(torch.device(device)) / 2**30
        if gib >= 20:  # a 2K output (256 latents) runs its VAE stages untiled
            return cls(encoder_tile=256, decoder_tile=256)
        if gib >= 10:
            return cls(encoder_tile=192, decoder_tile=160)
        return cls()

    @classmethod
    def from_tile_size(cls, tile_size: int, vae_scale: int = 8) -> "TilePlan":
        """One user-facing knob: the tile edge in output pixels drives every stage."""
        t = max(8, int(tile_size) // vae_scale // 8 * 8)  # multiples of 8 latents fit the UNet's downsamplings
        return cls(encoder_tile=t, encoder_overlap=max(2, t // 8), unet_tile=t, unet_overlap=max(2, t // 3),
                   decoder_tile=t, decoder_overlap=max(2, t // 8))

    def halved(self, min_tile: int = 8) -> "TilePlan | None":
        """Every stage's tile halved (multiples of 8 latents, at least ``min_tile``; overlaps kept below a third
        of the tile), for the out-of-memory retry; None when every tile is already at the minimum."""
        def half(t: int) -> int:
            return max(min_tile, t // 2 // 8 * 8)

        enc, unet, dec = half(self.encoder_tile), half(self.unet_tile), half(self.decoder_tile)
        if (enc, unet, dec) == (self.encoder_tile, self.unet_tile, self.decoder_tile):
            return None
        return dataclasses.replace(
            self, encoder_tile=enc, unet_tile=unet, decoder_tile=dec,
            encoder_overlap=min(self.encoder_overlap, max(2, enc // 8)),
            unet_overlap=min(self.unet_overlap, max(2, unet // 3)),
            decoder_overlap=min(self.decoder_overlap, max(2, dec // 8)))

    def describe(self) -> str:
        return (f"encoder {self.encoder_tile}, UNet {self.unet_tile}/{self.unet_overlap}, decoder "
                f"{self.decoder_tile} latents ({self.vae_mode} VAE tiles)")

    def vae_tile_count(self, h: int, w: int, stage: str) -> int:
        """Tiles of a VAE stage on an h x w latent grid."""
        tile = self.encoder_tile if stage == "encoder" else self.decoder_tile
        if self.vae_mode == "exact":
            from .tiled_vae import partition

            return len(partition(h, tile)) * len(partition(w, tile))
        return tile_count(h, w, tile, self.encoder_overlap if stage == "encoder" else self.decoder_overlap)


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


def tile_count(h: int, w: int, tile: int, overlap: int) -> int:
    th, tw = fit_tile(h, tile, overlap), fit_tile(w, tile, overlap)
    return len(tile_starts(h, th, overlap)) * len(tile_starts(w, tw, overlap))


def gaussian_weights(h: int, w: int, device=None, var: float = 0.01) -> torch.Tensor:
    """OSEDiff's separable Gaussian tile weights (variance 0.01 of the tile size), shape 1x1xhxw."""
    def axis(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float64, device=device)
        mid = (n - 1) / 2
        return torch.exp(-((x - mid) ** 2) / (n * n) / (2 * var))
    return (axis(h)[:, None] * axis(w)[None, :]).float()[None, None]


def run_tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, tile: int, overlap: int,
              in_factor: int, out_factor: int, out_channels: int, compute_device: torch.device,
              out_device: torch.device | None = None, progress: ProgressFn | None = None,
              skip: Callable[[torch.Tensor], bool] | None = None,
              norm_sync: torch.nn.Module | None = None, preview_side: int = 32, context: int = 0) -> torch.Tensor:
    """Apply ``fn`` over ``x`` (1xCxHxW, H and W multiples of ``in_factor``) tile by tile and blend.

    ``skip(tile_input)`` may return True for tiles whose output is known to be zero (e.g. an empty
    reference canvas); they are not computed. With ``norm_sync`` (the VAE), GroupNorm statistics come from a
    preview of the whole input whose longer side is ``preview_side`` latent units (see ``GroupNormSync``).
    ``context`` extra latent units are read around each tile and cropped from its output, so tile borders do
    not see zero padding (the VAE's receptive field is wide).
    """
    out_device = out_device or x.device
    h, w = x.shape[-2] // in_factor, x.shape[-1] // in_factor
    th, tw = fit_tile(h, tile, overlap), fit_tile(w, tile, overlap)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    if len(ys) == 1 and len(xs) == 1:
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
        return _blend_tiles(fn, x, ys, xs, th, tw, in_factor, out_factor, out_channels, compute_device, out_device,
                            progress, skip, context)


def _blend_tiles(fn, x, ys, xs, th, tw, in_factor, out_factor, out_channels, compute_device, out_device, progress,
                 skip, context):
    h, w = x.shape[-2] // in_factor, x.shape[-1] // in_factor
    out = torch.zeros(1, out_channels, h * out_factor, w * out_factor, device=out_device)
    weight_sum = torch.zeros(1, 1, h * out_factor, w * out_factor, device=out_device)
    weights = gaussian_weights(th * out_factor, tw * out_factor, device=out_device)
    for y in ys:
        for x0 in xs:
            # Read the tile plus up to ``context`` units around it (kept even so UNet/VAE strides still fit).
            y0, y1 = max(0, y - context), min(h, y + th + context)
            x1, x2 = max(0, x0 - context), min(w, x0 + tw + context)
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
