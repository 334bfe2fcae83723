"""One memory policy for every front end: a budget, tile plans from it, estimates, tile overhead, OOM retry.

* **Budget.** A fraction of the free RAM (CPU: ``MemAvailable``, capped by a cgroup limit) or VRAM (GPU:
  ``torch.cuda.mem_get_info`` plus what our allocator caches). The fraction is ``UpscaleOptions.memory_fraction``,
  else env ``HEADSUP_MEMORY_FRACTION``, else ``DEFAULT_FRACTION``; ``memory_budget_mb`` sets it outright.
* **Plan.** Per stage the largest tile whose estimated working set fits the budget; the whole image (untiled,
  no overlap or context recomputed) when it fits. The same logic on every device.
* **Estimate.** Activation bytes per stage from the plan and the model's widths and dtypes, plus the weights.
  The constants are rough working-set sizes in "full-resolution channels"; the OOM retry covers misses.
* **Retry.** ``upscale_with_retry`` halves every tile (``TilePlan.halved``) on out-of-memory, with a log line.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Callable

import torch

from .tiling import TilePlan, fit_tile, tile_starts

log = logging.getLogger("headsup")
ENV_FRACTION = "HEADSUP_MEMORY_FRACTION"
DEFAULT_FRACTION = {"cpu": 0.5, "cuda": 0.8, "mps": 0.5}
# Working set of one stage per pixel it computes, in multiples of the stage's first width (VAE: 128 channels at
# full resolution, UNet: 320 channels at latent resolution). The exact tiled VAE parks every tile's current
# activation and residual (STORE) while the tiles run in lockstep: on a CPU in RAM up to what the budget leaves
# after the tile working set (memory.store_budget), the rest in a spill file (spill.py), so with a budget the
# stage's RAM no longer grows with the image.
# Calibrated on the SD2.1 VAE, fp32, CPU, 512² (peak RSS above the weights): untiled encoder 780 MB, decoder
# 1371 MB. STORE: the store's peak measured at 1024² in 2x2 exact tiles of 64 latents (bench/vae_memory.py) is
# 1.8 (fp32 encoder) and 2.9 (bf16 decoder: 256 channels at full resolution before its last up block's shortcut).
# UNET: the SD2.1-size UNet in fp32 at a 128² latent tile raised the process peak by ~1.45 GB (bench/pipeline.py,
# fp16-stored weights, 1024² output): ~70 x 320 channels x 4 bytes per latent (the feed-forward's 4x-wide GEGLU
# and the attention's projections dominate); the earlier 20 under-counted it ~3.5x.
ENCODER_CH, DECODER_CH, UNET_CH, STORE_CH = 6, 11, 70, 3
CANDIDATE_TILES = (256, 192, 160, 128, 112, 96, 80, 64, 48, 32, 16)
# The UNet's self-attention is quadratic in the tile's tokens and SD2.1-base was trained on 64-latent crops
# (OSEDiff tiles at 96): its tile stays at most this many latents (1024 px) even when memory allows more.
UNET_MAX_TILE = 128
STAGES = ("encoder", "unet", "decoder")


# ----------------------------------------------------------------------------------------------- budget
def free_bytes(device: torch.device) -> int:
    """Memory the next allocations can use on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "mps":
        try:
            return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
        except (AttributeError, RuntimeError):
            return 8 << 30
    return _free_ram()


def _free_ram() -> int:
    avail = None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            import psutil

            avail = int(psutil.virtual_memory().available)
        except ImportError:
            avail = 8 << 30
    try:  # a container's own limit (cgroup v2)
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as fh:
            limit = fh.read().strip()
        if limit.isdigit():
            with open("/sys/fs/cgroup/memory.current", encoding="ascii") as fh:
                avail = min(avail, int(limit) - int(fh.read().strip()))
    except (OSError, ValueError):
        pass
    return max(0, avail)


def memory_fraction(fraction: float | None, device: torch.device) -> float:
    if fraction is None and os.environ.get(ENV_FRACTION):
        try:
            fraction = float(os.environ[ENV_FRACTION])
        except ValueError:
            log.warning("HeadsUp: ignoring %s=%r (not a number).", ENV_FRACTION, os.environ[ENV_FRACTION])
    if fraction is None or not 0 < fraction <= 1:
        fraction = DEFAULT_FRACTION.get(torch.device(device).type, 0.5)
    return float(fraction)


def budget_bytes(device: torch.device, fraction: float | None = None, budget_mb: float | None = None) -> int:
    if budget_mb is not None:
        return int(float(budget_mb) * 2**20)
    return int(memory_fraction(fraction, device) * free_bytes(device))


# ----------------------------------------------------------------------------------------------- model facts
def _width(module, default: int) -> int:
    cfg = getattr(module, "config", None)
    widths = getattr(cfg, "block_out_channels", None)
    if widths:
        return int(widths[0])
    return int(getattr(module, "model_channels", None) or default)  # ComfyUI's UNetModel


def _bytes(model, attr: str) -> int:
    for name in (attr, "dtype"):
        try:
            return torch.finfo(getattr(model, name)).bits // 8
        except (AttributeError, TypeError, StopIteration):
            continue
    return 4


def weights_bytes(model) -> int:
    try:
        return sum(p.numel() * p.element_size() for p in model.parameters())
    except (AttributeError, TypeError):
        return 0


# ----------------------------------------------------------------------------------------------- tiles
def stage_reads(plan: TilePlan, latent_hw: tuple[int, int], stage: str) -> list[tuple[int, int]]:
    """(height, width) in latents of every tile the stage computes, context included."""
    h, w = latent_hw
    if stage != "unet" and plan.vae_mode == "exact":
        from .tiled_vae import partition

        tile = plan.encoder_tile if stage == "encoder" else plan.decoder_tile
        ctx = plan.encoder_context if stage == "encoder" else plan.decoder_context
        py, px = partition(h, tile), partition(w, tile)
        if len(py) * len(px) == 1:
            return [(h, w)]

        def span(core, n):
            return min(n, core[1] + ctx) - max(0, core[0] - ctx)
        return [(span(cy, h), span(cx, w)) for cy in py for cx in px]
    tile, overlap, ctx = {"encoder": (plan.encoder_tile, plan.encoder_overlap, plan.encoder_overlap),
                          "unet": (plan.unet_tile, plan.unet_overlap, 0),
                          "decoder": (plan.decoder_tile, plan.decoder_overlap, plan.decoder_overlap // 2)}[stage]
    th, tw = fit_tile(h, tile, overlap), fit_tile(w, tile, overlap)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    if len(ys) * len(xs) == 1:
        return [(h, w)]
    return [(min(h, y + th + ctx) - max(0, y - ctx), min(w, x + tw + ctx) - max(0, x - ctx)) for y in ys for x in xs]


def stage_overhead(plan: TilePlan, latent_hw: tuple[int, int], stage: str) -> tuple[int, float]:
    """(tiles, extra work): pixels computed over the image's pixels, minus 1 (0.0 when untiled)."""
    reads = stage_reads(plan, latent_hw, stage)
    return len(reads), sum(a * b for a, b in reads) / (latent_hw[0] * latent_hw[1]) - 1.0


def tile_bytes(model, plan: TilePlan, latent_hw: tuple[int, int], stage: str) -> int:
    """Estimated working set of the stage's biggest tile (what one tile computes at a time)."""
    reads = stage_reads(plan, latent_hw, stage)
    biggest = max(a * b for a, b in reads)
    if stage == "unet":
        return int(UNET_CH * _width(model.unet, 320) * biggest * _bytes(model, "dtype"))
    s2 = getattr(model, "vae_scale", 8) ** 2
    vae_c, per = _width(getattr(model, "vae", None), 128), _bytes(model, f"{stage}_dtype")
    return int((ENCODER_CH if stage == "encoder" else DECODER_CH) * vae_c * biggest * s2 * per)


def store_bytes(model, plan: TilePlan, latent_hw: tuple[int, int], stage: str, device: torch.device) -> int:
    """Activations the exact tiled VAE parks between its lockstep steps, all tiles together, when they all stay
    in RAM (0 for the UNet, an untiled stage, fast tiles, or a GPU, where they wait in CPU RAM instead)."""
    if stage == "unet" or plan.vae_mode != "exact" or torch.device(device).type != "cpu":
        return 0
    reads = stage_reads(plan, latent_hw, stage)
    if len(reads) == 1:
        return 0
    s2 = getattr(model, "vae_scale", 8) ** 2
    vae_c, per = _width(getattr(model, "vae", None), 128), _bytes(model, f"{stage}_dtype")
    return int(STORE_CH * vae_c * sum(a * b for a, b in reads) * s2 * per)


def store_budget(model, plan: TilePlan, latent_hw: tuple[int, int], stage: str, budget: int) -> int:
    """RAM the exact tiled VAE may park activations in (``run_exact``'s ``ram_budget``; the rest spills to
    disk): the budget left after the image buffers and the stage's tile working set. The budget is a share of
    the memory free once the weights are loaded (``budget_bytes``), so the weights are not counted again."""
    return max(0, int(budget) - image_bytes(model, latent_hw) - tile_bytes(model, plan, latent_hw, stage))


def vae_ram_budget(model, plan: TilePlan, latent_hw: tuple[int, int], stage: str, device: torch.device,
                   fraction: float | None = None, budget_mb: float | None = None) -> int:
    """``run_exact``'s ``ram_budget`` for a VAE stage on ``device``, from the same budget the plan comes from.
    On a GPU the parked activations wait in CPU RAM: a share of the free RAM (``budget_mb`` is the GPU's)."""
    if torch.device(device).type != "cpu":
        return budget_bytes(torch.device("cpu"), fraction)
    return store_budget(model, plan, latent_hw, stage, budget_bytes(device, fraction, budget_mb))


def stage_bytes(model, plan: TilePlan, latent_hw: tuple[int, int], stage: str, device: torch.device,
                budget: int | None = None) -> int:
    """Estimated peak activation bytes of one stage under ``plan``: the tile working set, plus (exact VAE tiles
    on a CPU) the parked activations, at most what ``budget`` leaves for them (``store_budget``; the rest
    spills to disk, so with a budget the estimate no longer grows with the image); ``None``: unbounded."""
    need = tile_bytes(model, plan, latent_hw, stage)
    parked = store_bytes(model, plan, latent_hw, stage, device)
    if budget is not None and parked:
        parked = min(parked, store_budget(model, plan, latent_hw, stage, budget))
    return int(need + parked)


def image_bytes(model, latent_hw: tuple[int, int]) -> int:
    """Full-size float buffers the pipeline keeps (bicubic input, padded copy, decoded image, output)."""
    return 4 * 3 * latent_hw[0] * latent_hw[1] * getattr(model, "vae_scale", 8) ** 2 * 4


def estimate(model, plan: TilePlan, latent_hw: tuple[int, int], device: torch.device,
             budget: int | None = None) -> dict:
    """Bytes: weights, image buffers, each stage's activations, and the peak (weights + buffers + worst stage).
    ``budget``: the memory budget the run gets (the exact VAE spills parked activations beyond what it leaves);
    ``None``: everything stays in RAM."""
    stages = {s: stage_bytes(model, plan, latent_hw, s, device, budget) for s in STAGES}
    out = {"weights": weights_bytes(model), "images": image_bytes(model, latent_hw), **stages}
    out["activations"] = out["images"] + max(stages.values())
    out["peak"] = out["weights"] + out["activations"]
    return out


def estimate_request(pipe, image, options=None) -> dict:
    """``estimate`` for the plan ``pipe.upscale(image, options=options)`` would run (e.g. ComfyUI's
    ``memory_required``: its ``activations``)."""
    from .imageio import to_batch
    from .options import UpscaleOptions
    from .pipeline import output_size

    opts = options or UpscaleOptions()
    h, w = image if isinstance(image, tuple) else to_batch(image).size
    out_hw = output_size(h, w, opts.scale)
    budget = budget_bytes(pipe.device, opts.memory_fraction, opts.memory_budget_mb)
    return estimate(pipe.model, pipe.plan_for((h, w), opts), pipe.latent_size(out_hw), pipe.device, budget)


def plan_for_budget(model, latent_hw: tuple[int, int], budget: int, device: torch.device,
                    vae_mode: str = "exact") -> TilePlan:
    """The largest tile per stage whose working set fits ``budget`` bytes (the whole image when it fits); when
    none fits, the tile with the smallest estimate. The exact VAE's parked activations count only up to what the
    budget leaves after the tile (the rest spills to disk, see spill.py), so on a CPU an image too large to run
    untiled is tiled rather than run whole."""
    full = max(latent_hw)
    room = budget - image_bytes(model, latent_hw)
    tiles, fits = {}, True
    base = TilePlan(vae_mode=vae_mode)
    for stage in STAGES:
        best = None
        top = min(full, UNET_MAX_TILE) if stage == "unet" else full
        for t in [top] + [c for c in CANDIDATE_TILES if c < top]:
            need = stage_bytes(model, _with_tile(base, stage, t), latent_hw, stage, device, budget)
            if best is None or need < best[0]:
                best = (need, t)
            if need <= room:
                break
        else:
            fits, t = False, best[1]
        tiles[stage] = t
    plan = base
    for stage, t in tiles.items():
        plan = _with_tile(plan, stage, t)
    if not fits:
        log.warning("HeadsUp: the memory budget (%.0f MB) is below every tile size's estimate; running with "
                    "the tiles that need least (set memory_fraction / %s higher, or free memory).", budget / 2**20,
                    ENV_FRACTION)
    return plan


def _with_tile(plan: TilePlan, stage: str, t: int) -> TilePlan:
    import dataclasses

    if stage == "encoder":
        return dataclasses.replace(plan, encoder_tile=t, encoder_overlap=max(2, min(8, t // 8)))
    if stage == "decoder":
        return dataclasses.replace(plan, decoder_tile=t, decoder_overlap=max(2, min(8, t // 8)))
    return dataclasses.replace(plan, unet_tile=t, unet_overlap=max(2, min(32, t // 3 // 8 * 8 or t // 3)))


# ----------------------------------------------------------------------------------------------- OOM retry
def is_oom(exc: BaseException) -> bool:
    """Out of memory on any device: torch's OOM error, MemoryError, or the CPU allocator's message."""
    from .devices import OOM_ERRORS

    if isinstance(exc, OOM_ERRORS + (MemoryError,)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def upscale_with_retry(pipe, image, *, options=None, is_oom: Callable[[BaseException], bool] = is_oom,
                       before_try: Callable | None = None, after_oom: Callable[[], None] | None = None, **kwargs):
    """``pipe.upscale(image, options=..., **kwargs)``; on out-of-memory, halve every tile and retry (logged),
    until the tiles are at their minimum. ``before_try(options)`` runs before each attempt (e.g. ComfyUI's
    ``load_models_gpu`` with the estimate), ``after_oom()`` after a failed one (default: empty the cache)."""
    from .devices import empty_cache
    from .errors import HeadsUpError
    from .options import OPTION_NAMES, UpscaleOptions

    opts = UpscaleOptions.merge(options, **{k: kwargs.pop(k) for k in list(kwargs) if k in OPTION_NAMES})
    plan = None
    while True:
        if before_try is not None:
            before_try(opts)
        try:
            return pipe.upscale(image, options=opts, **kwargs)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
            if not is_oom(exc):
                raise
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        # Outside the except block, so the failed attempt's tensors are released before the cache is emptied.
        if after_oom is not None:
            after_oom()
        else:
            empty_cache(pipe.device)
        if plan is None:
            plan = pipe.plan_for(image, opts)
        smaller = plan.halved()
        if smaller is None:
            raise HeadsUpError(f"HeadsUp ran out of memory even with the smallest tiles ({plan.describe()}): free "
                               "memory (close other models) or use a smaller image.")
        log.warning("HeadsUp: out of memory (%s) with tiles %s; retrying with %s.", reason, plan.describe(),
                    smaller.describe())
        plan, opts = smaller, opts.with_tiles(smaller)


def latent_size(out_hw: tuple[int, int], multiple: int, vae_scale: int) -> tuple[int, int]:
    """Latent size of an output padded to ``multiple`` pixels."""
    return (math.ceil(out_hw[0] / multiple) * multiple // vae_scale, math.ceil(out_hw[1] / multiple) * multiple // vae_scale)
