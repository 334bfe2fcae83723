"""One plan per request: sizes, tiles, memory budget and estimate, decided once and then run as they are.

``plan_request(backend, image_size, options, device)`` reads the memory budget once, picks the tiles (the
user's ``tile_size``, else per stage the largest tile whose estimated working set fits the budget; the whole
image, untiled, when it fits) and estimates the run's memory. A front end reports ``plan.estimate`` to its
host (ComfyUI's memory manager) and hands the same plan to ``HeadsUpPipeline.upscale``; the OOM retry
(runner.py) runs ``plan.halved()``. The plan also fixes the progress total: ``Plan.tile_ticks`` per tile (its
progress units and attention chunks on a CPU, see ``progress_units``), so a front end's bar ends exactly at 100 %.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from . import memory
from .geometry import latent_size, output_size
from .options import UpscaleOptions
from .tiling import PLANNER_OVERLAP_CAP, STAGES, Tile, TilePlan

log = logging.getLogger("headsup")
CANDIDATE_TILES = (256, 192, 160, 128, 112, 96, 80, 64, 48, 32, 16)
# The UNet's self-attention is quadratic in the tile's tokens and SD2.1-base was trained on 64-latent crops
# (OSEDiff tiles at 96): its tile stays at most this many latents (1024 px) even when memory allows more.
UNET_MAX_TILE = 128
# The sub-modules whose ends are progress ticks inside one tile (class names of diffusers' and ComfyUI's SD
# layouts): resnets, down/upsamplers and attention, each called once per forward. A stage that runs as one
# forward still moves the bar at every one of them.
PROGRESS_UNITS = frozenset({
    "ResnetBlock2D", "Downsample2D", "Upsample2D", "Attention", "Transformer2DModel",   # diffusers
    "ResnetBlock", "AttnBlock", "ResBlock", "SpatialTransformer", "Downsample", "Upsample",  # ComfyUI (ldm)
})
# Devices where a tile can take long enough to need ticks inside it. On CUDA a tile takes well under a second,
# and hooks inside a torch.compile'd UNet would only cost graph breaks.
TICK_INSIDE_DEVICES = ("cpu", "mps")
# A CPU runs a large VAE self-attention in up to ATTENTION_CHUNKS query chunks of at least ATTENTION_MIN_CHUNK
# tokens, starting at multiples of ATTENTION_ALIGN: the CPU's flash attention then splits every chunk into the
# same 256-query blocks as the whole (it picks its block size from the query count, 256 from 768 up), so each
# query's arithmetic is the one of the unchunked call (stages.ChunkedAttention).
ATTENTION_CHUNKS, ATTENTION_MIN_CHUNK, ATTENTION_ALIGN = 32, 1024, 256


def progress_units(backend, stage: str) -> list[torch.nn.Module]:
    """The modules of ``stage`` whose forward ends tick progress inside a tile (empty: a compiled UNet, which
    hooks would break, or a layout without known units: one tick per tile)."""
    module = backend.unet if stage == "unet" else getattr(backend.vae, stage, None)
    if not isinstance(module, torch.nn.Module) or type(module).__name__ == "OptimizedModule":
        return []  # not a module we can hook, or torch.compile's wrapper (perf.compile_unet)
    return [m for m in module.modules() if type(m).__name__ in PROGRESS_UNITS]


def chunked_attentions(backend, stage: str) -> list[torch.nn.Module]:
    """A VAE stage's whole-tile self-attentions (diffusers ``Attention`` with a GroupNorm, run by
    ``AttnProcessor2_0``) that a CPU runs in ``ATTENTION_CHUNKS`` query chunks, a tick after each
    (stages.ChunkedAttention): at the quick start's size one such attention takes most of its stage."""
    if stage == "unet":
        return []
    return [m for m in progress_units(backend, stage) if type(m).__name__ == "Attention"
            and m.group_norm is not None and m.spatial_norm is None
            and type(m.processor).__name__ == "AttnProcessor2_0"]


def attention_chunks(tokens: int) -> list[tuple[int, int]]:
    """Up to ``ATTENTION_CHUNKS`` (start, end) query ranges; one range (no chunking) below two minimum chunks."""
    count = min(ATTENTION_CHUNKS, tokens // ATTENTION_MIN_CHUNK)
    if count < 2:
        return [(0, tokens)]
    step = tokens // count // ATTENTION_ALIGN * ATTENTION_ALIGN
    return [(i * step, (i + 1) * step if i + 1 < count else tokens) for i in range(count)]


def tick_sources(backend, device: torch.device) -> dict[str, tuple[int, int]]:
    """Per stage, (progress units, chunked attentions) a tile ticks at: on a CPU both, on MPS the units, on
    other devices neither (one tick per tile)."""
    kind = torch.device(device).type
    if kind not in TICK_INSIDE_DEVICES:
        return {s: (0, 0) for s in STAGES}
    return {s: (len(progress_units(backend, s)), len(chunked_attentions(backend, s)) if kind == "cpu" else 0)
            for s in STAGES}


def plan_for_budget(model, latent_hw: tuple[int, int], budget: int, device: torch.device,
                    vae_mode: str = "exact") -> TilePlan:
    """The largest tile per stage whose working set fits ``budget`` bytes (the whole image when it fits); when
    none fits, the tile with the smallest estimate. The exact VAE's parked activations count only up to what the
    budget leaves after the tile (the rest spills to disk, see spill.py), so on a CPU an image too large to run
    untiled is tiled rather than run whole."""
    full = max(latent_hw)
    room = budget - memory.image_bytes(model, latent_hw)
    fits = True
    plan = base = TilePlan(vae_mode=vae_mode)
    for stage in STAGES:
        best = None
        top = min(full, UNET_MAX_TILE) if stage == "unet" else full
        for t in [top] + [c for c in CANDIDATE_TILES if c < top]:
            need = memory.stage_bytes(model, base.with_tile(stage, t, PLANNER_OVERLAP_CAP[stage]), latent_hw, stage,
                                      device, budget)
            if best is None or need < best[0]:
                best = (need, t)
            if need <= room:
                break
        else:
            fits, t = False, best[1]
        plan = plan.with_tile(stage, t, PLANNER_OVERLAP_CAP[stage])
    if not fits:
        log.warning("HeadsUp: the memory budget (%.0f MB) is below every tile size's estimate; running with "
                    "the tiles that need least (set memory_fraction / %s higher, or free memory).", budget / 2**20,
                    memory.ENV_FRACTION)
    return plan


@dataclass(frozen=True)
class Plan:
    """What one request runs with. ``budget``: the device's memory budget in bytes, read once;
    ``parking_budget``: RAM the exact tiled VAE may park activations in per VAE stage (the rest spills to
    disk); ``estimate``: ``memory.estimate`` of these tiles (``activations`` is what a host reserves);
    ``tick_sources``: what a tile of each stage ticks at (``tick_sources``; see ``tile_ticks``)."""
    backend: object = dataclasses.field(repr=False, compare=False)
    options: UpscaleOptions
    tiles: TilePlan
    out_hw: tuple[int, int]
    latent_hw: tuple[int, int]
    device: torch.device
    budget: int
    estimate: dict
    parking_budget: dict
    tick_sources: dict = dataclasses.field(default_factory=lambda: {s: (0, 0) for s in STAGES})

    def grid(self, stage: str) -> list[Tile]:
        return self.tiles.grid(stage, self.latent_hw)

    def stage_ticks(self, stage: str, latent_hw: tuple[int, int] | None = None) -> int:
        """Progress ticks of ``stage`` on this plan's latent (or on ``latent_hw``, e.g. a reference window)."""
        return sum(self.tile_ticks(stage, t) for t in self.tiles.grid(stage, latent_hw or self.latent_hw))

    def tile_ticks(self, stage: str, tile: Tile) -> int:
        """Progress ticks of one tile: one per progress unit, plus one per extra query chunk of each chunked
        attention (which runs at the latent resolution over the tile's window); at least one."""
        units, attentions = self.tick_sources[stage]
        chunks = len(attention_chunks(tile.read_hw[0] * tile.read_hw[1])) - 1 if attentions else 0
        return max(1, units + attentions * chunks)

    def ticks_per_image(self) -> int:
        """Progress ticks of one image (a reference's windows add their own when they are known)."""
        return sum(self.stage_ticks(s) for s in STAGES)

    def describe(self) -> str:
        return self.tiles.describe()

    def halved(self) -> "Plan | None":
        """This plan with every tile halved (the OOM retry), on the same budget; None at the smallest tiles."""
        smaller = self.tiles.halved()
        if smaller is None:
            return None
        return _finish(self.backend, self.options, smaller, self.out_hw, self.latent_hw, self.device, self.budget,
                       self.parking_budget["encoder"])


def _finish(backend, options, tiles, out_hw, latent_hw, device, budget, host_ram: int | None = None) -> Plan:
    if device.type == "cpu":
        parking = {s: memory.store_budget(backend, tiles, latent_hw, s, budget) for s in ("encoder", "decoder")}
    else:  # on a GPU the parked activations wait in CPU RAM: a share of the free RAM
        ram = memory.budget_bytes(torch.device("cpu"), options.memory_fraction) if host_ram is None else host_ram
        parking = {"encoder": ram, "decoder": ram}
    estimate = memory.estimate(backend, tiles, latent_hw, device, budget)
    return Plan(backend, options, tiles, out_hw, latent_hw, device, budget, estimate, parking,
                tick_sources(backend, device))


def plan_request(backend, image_size: tuple[int, int], options: UpscaleOptions | None = None,
                 device: torch.device | None = None, budget: int | None = None) -> Plan:
    """The plan for upscaling an ``image_size`` (h, w) image with ``options`` on ``backend`` (its
    ``pixel_multiple``, ``vae_scale``, widths and dtypes); ``budget`` in bytes, else read once from ``device``."""
    opts = options or UpscaleOptions()
    device = torch.device(device if device is not None else backend.device)
    out_hw = output_size(*image_size, opts.scale)
    latent_hw = latent_size(out_hw, backend.pixel_multiple, backend.vae_scale)
    if budget is None:
        budget = memory.budget_bytes(device, opts.memory_fraction, opts.memory_budget_mb)
    tiles = opts.tile_size
    if tiles is None:
        tiles = plan_for_budget(backend, latent_hw, budget, device, opts.vae_tiling or "exact")
    elif not isinstance(tiles, TilePlan):
        tiles = TilePlan.from_tile_size(int(tiles), backend.vae_scale)  # options checked it is >= 64 px
    if opts.vae_tiling is not None:  # "exact" (default: whole-image GroupNorm statistics) or "fast" (preview)
        tiles = dataclasses.replace(tiles, vae_mode=opts.vae_tiling)
    if tiles.vae_mode == "exact" and not backend.supports_exact_vae:  # e.g. ComfyUI's own VAE: blended tiles
        tiles = dataclasses.replace(tiles, vae_mode="fast")
    return _finish(backend, opts, tiles, out_hw, latent_hw, device, budget)
