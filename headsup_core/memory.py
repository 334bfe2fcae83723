"""One memory policy for every front end: a budget, tile plans from it, estimates, tile overhead, OOM retry.

* **Budget.** A fraction of the free RAM (CPU: ``MemAvailable``, capped by a cgroup limit) or VRAM (GPU:
  ``torch.cuda.mem_get_info`` plus what our allocator caches). The fraction is ``UpscaleOptions.memory_fraction``,
  else env ``HEADSUP_MEMORY_FRACTION``, else ``DEFAULT_FRACTION``; ``memory_budget_mb`` sets it outright.
* **Estimate.** Activation bytes per stage from the plan's tile grid (``TilePlan.grid``) and the model's widths
  and dtypes, plus the weights. The constants are rough working-set sizes in "full-resolution channels"; the
  OOM retry covers misses.
* **Out of memory.** ``is_oom`` says which errors are one (the retry itself is runner.py's).

The plan that uses these (per stage the largest tile that fits the budget) is planner.py's.
"""
from __future__ import annotations

import logging
import os

import torch

from . import devices
from .devices import OOM_ERRORS
from .tiling import STAGES, TilePlan

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


def hold_to_budget(device: torch.device, budget_mb: float | None) -> bool:
    """A CPU run with a budget given in MB (``--memory-budget-mb``) keeps its peak to that budget: large blocks
    are mapped one by one (``devices.map_large_blocks``), so freed tile buffers do not stay resident. Measured at
    1024², 800 MB, fp16 UNet weights: peak RSS 4.33 -> 3.82 GB (single file) and 4.58 -> 3.87 GB (diffusers
    folder), time +2-4 % (docs/benchmark.md). Without a budget
    in MB (the default budget, and ComfyUI and A1111, which manage their own memory) the allocator is left alone.
    Returns whether it applies."""
    if budget_mb is None or torch.device(device).type != "cpu":
        return False
    return devices.map_large_blocks()


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
    return [t.read_hw for t in plan.grid(stage, latent_hw)]


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


# ----------------------------------------------------------------------------------------------- out of memory
def is_oom(exc: BaseException) -> bool:
    """Out of memory on any device: torch's OOM error, MemoryError, or the CPU allocator's message."""
    if isinstance(exc, OOM_ERRORS + (MemoryError,)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
