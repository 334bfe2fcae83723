"""Sizes: the output of a request, its latent once padded, and the partition of a length into tile cores.

Geometry layer: a leaf (imports only ``errors``); tiling.py builds the tile grids on it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import InputImageError

MAX_OUTPUT_SIDE = 32768


def output_size(h: int, w: int, scale: float) -> tuple[int, int]:
    oh, ow = max(1, round(h * scale)), max(1, round(w * scale))
    if max(oh, ow) > MAX_OUTPUT_SIDE:
        raise InputImageError(f"The output would be {ow}x{oh} pixels; sides above {MAX_OUTPUT_SIDE} are not supported.")
    return oh, ow


def latent_size(out_hw: tuple[int, int], multiple: int, vae_scale: int) -> tuple[int, int]:
    """Latent size of an output padded to ``multiple`` pixels."""
    return tuple(math.ceil(side / multiple) * multiple // vae_scale for side in out_hw)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad the bottom/right of ``x`` to a multiple of ``multiple`` pixels (the UNet's downsamplings)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (0, pw, 0, ph), mode="replicate")


def partition(length: int, tile: int) -> list[tuple[int, int]]:
    """Split ``length`` latent units into nearly equal cores of at most ``tile``."""
    n = max(1, math.ceil(length / max(1, tile)))
    bounds = [round(i * length / n) for i in range(n + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(n)]
