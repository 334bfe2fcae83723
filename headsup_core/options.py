"""One upscale request: ``UpscaleOptions``, validated once and taken by ``HeadsUpPipeline.upscale``.

Front ends (CLI, ComfyUI nodes, A1111 script, eval) build one of these, or pass the same names as keywords to
``pipe.upscale``, which applies them once (``UpscaleOptions.override``: a keyword that is passed wins, also when
it names the default); planner.py turns the options into one plan per request.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from .choices import COLOR_FIX_MODES, VAE_TILING_MODES
from .errors import InputImageError
from .tiling import TilePlan

MAX_SCALE = 16.0


class _Unset:
    """The default of ``pipe.upscale``'s keywords: "not given", so only what a caller passes overrides."""

    def __repr__(self) -> str:
        return "<from options>"


UNSET = _Unset()


def check_scale(scale: float) -> float:
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise InputImageError(f"The scale must be a number, got {scale!r}.") from None
    if not math.isfinite(scale) or scale < 1.0:
        raise InputImageError(f"Unsupported scale {scale}: HeadsUp upscales, so the scale must be at least 1.")
    if scale > MAX_SCALE:
        raise InputImageError(f"Unsupported scale {scale}: at most {MAX_SCALE:g}x; upscale in two passes instead.")
    return scale


@dataclass(frozen=True)
class UpscaleOptions:
    """Everything that changes an upscale's result or its memory use (not the image, references or callbacks).

    ``tile_size``: ``None`` plans tiles from the memory budget (a stage runs untiled when it fits), an int is the
    tile edge in output pixels for every stage, a ``TilePlan`` is used as it is. The budget is
    ``memory_budget_mb`` when given, else ``memory_fraction`` (default: env ``HEADSUP_MEMORY_FRACTION``, else
    the device's default in ``memory.py``) of the free RAM (CPU) or VRAM (GPU).
    """
    scale: float = 4.0
    tile_size: int | TilePlan | None = None
    color_fix: str = "adain"
    seed: int = 0
    strength: float = 1.0                 # fidelity <-> detail: 1 = the model's full restoration
    match_threshold: float | None = None  # min identity similarity for a reference to be placed on a face
    prompt: str | None = None
    prompt_embeds: Any = None             # Bx77xD (or 77xD) tensor; wins over ``prompt``
    mask_without_reference: bool = True   # draw the face mask also when no reference matches a face
    vae_tiling: str | None = None         # "exact" (default) or "fast"
    tag_source: Callable | None = None    # LQ image -> tags, put into OSEDiff's prompt form
    memory_fraction: float | None = None
    memory_budget_mb: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "scale", check_scale(self.scale))
        if self.color_fix not in COLOR_FIX_MODES:
            raise InputImageError(f"Unknown colour fix {self.color_fix!r}; choose one of {', '.join(COLOR_FIX_MODES)}.")
        try:
            strength = float(self.strength)
        except (TypeError, ValueError):
            strength = float("nan")
        if not 0.0 <= strength <= 1.0:
            raise InputImageError(f"strength must be between 0 and 1, got {self.strength}.")
        object.__setattr__(self, "strength", strength)
        if self.vae_tiling is not None and self.vae_tiling not in VAE_TILING_MODES:
            raise InputImageError(f"Unknown VAE tiling mode {self.vae_tiling!r}; use 'exact' or 'fast'.")
        ts = self.tile_size
        if ts is not None and not isinstance(ts, TilePlan):
            try:
                ts = int(ts)
            except (TypeError, ValueError):
                raise InputImageError(f"tile_size must be a number of output pixels, got {ts!r}.") from None
            if ts < 64:
                raise InputImageError(f"tile_size {ts} is too small; use at least 64 output pixels.")
            object.__setattr__(self, "tile_size", ts)
        if self.memory_fraction is not None and not 0.0 < float(self.memory_fraction) <= 1.0:
            raise InputImageError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}.")
        if self.memory_budget_mb is not None and not float(self.memory_budget_mb) > 0:
            raise InputImageError(f"memory_budget_mb must be positive, got {self.memory_budget_mb}.")

    @classmethod
    def override(cls, options: "UpscaleOptions | None" = None, **given) -> "UpscaleOptions":
        """``options`` (default: all defaults) with every given field replaced (``UNSET`` ones skipped), in one
        ``dataclasses.replace``; a field given at its default value is set back to it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(given) - names)
        if unknown:
            raise TypeError(f"unknown upscale option(s): {', '.join(unknown)}")
        given = {k: v for k, v in given.items() if v is not UNSET}
        if options is None:
            return cls(**given)
        return dataclasses.replace(options, **given) if given else options

    @classmethod
    def merge(cls, options: "UpscaleOptions | None" = None, **fields) -> "UpscaleOptions":
        """``options`` with the given fields applied, where a field given at its default value does not override
        (for callers that pass every keyword with its default; ``override`` is the exact form)."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        return cls.override(options, **{k: v for k, v in fields.items()
                                         if options is None or k not in names or not _same(v, names[k].default)})


def _same(value, default) -> bool:
    if value is None or default is None:
        return value is default
    try:
        return bool(value == default) and type(value) is type(default) or (
            isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(default, (int, float))
            and float(value) == float(default))
    except (TypeError, RuntimeError, ValueError):  # tensors and other non-comparables always override
        return False


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(UpscaleOptions))
