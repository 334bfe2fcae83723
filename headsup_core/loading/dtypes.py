"""Which dtype each stage computes in, and which dtype its weights are kept in between layers.

Compute dtypes come from perf.py's measured per-stage choice (CPU: fp32 UNet and encoder, bf16 decoder on CPUs
with native bf16; GPU: the device dtype). The weights are read from the file straight into their storage dtype.

Storage equals compute unless memory is short. On a CPU, when the fp32 weights would take more than
``STORAGE_SHARE`` of the memory budget (memory.py), the UNet keeps its weights in fp16 and each layer is cast up
for its own forward (diffusers' layerwise casting). That halves the resident weights (SD2.1: 3.8 -> 2.1 GB) and
costs casts per layer per call; fp16 keeps 11 mantissa bits, the precision SD2 checkpoints are usually
distributed in. ``weight_dtype`` (CLI ``--weight-dtype``) chooses it outright. The VAE (0.3 GB in fp32) always
keeps its compute dtype: diffusers' decoder casts its activations to its weights' dtype, so narrower storage
would break it, and it would save little.
"""
from __future__ import annotations

import logging

import torch

from ..choices import WEIGHT_DTYPE_CHOICES

log = logging.getLogger("headsup")
STAGES = ("unet", "encoder", "decoder")
NARROW_STAGES = ("unet",)  # the stages whose weights may be stored narrower than they compute
STORAGE_SHARE = 0.5  # fp32 weights above this share of the memory budget -> 16-bit storage (auto)
_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def compute_dtypes(device: torch.device, dtype_requested=None) -> dict[str, torch.dtype]:
    """The dtype each stage computes in: ``dtype_requested`` for every stage when named, else the device dtype
    with perf.py's measured CPU exceptions (bf16 stages)."""
    from .. import devices
    from ..perf import cpu_bf16_stages

    dt = devices.pick_dtype(dtype_requested, device)
    out = {s: dt for s in STAGES}
    if torch.device(device).type == "cpu" and dtype_requested in (None, "auto"):
        for stage in cpu_bf16_stages():
            out[stage] = torch.bfloat16
    return out


def storage_dtypes(device: torch.device, compute: dict[str, torch.dtype], weight_dtype: str | None = "auto",
                   fp32_weight_bytes: int = 0, budget: int | None = None) -> dict[str, torch.dtype]:
    """The dtype each stage's weights are kept in. Storage is never wider than compute."""
    weight_dtype = (weight_dtype or "auto").lower()
    if weight_dtype not in WEIGHT_DTYPE_CHOICES:
        from ..errors import HeadsUpError

        raise HeadsUpError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPE_CHOICES)}, got {weight_dtype!r}.")
    if weight_dtype == "auto":
        narrow = None
        if torch.device(device).type == "cpu" and fp32_weight_bytes:
            if budget is None:
                from ..memory import budget_bytes

                budget = budget_bytes(device)
            if fp32_weight_bytes > STORAGE_SHARE * budget:
                narrow = torch.float16
                log.info("HeadsUp: keeping fp32 stages' weights in fp16 (%.1f GB of fp32 weights > %.0f%% of the "
                         "%.1f GB memory budget); each layer is cast to fp32 for its forward.",
                         fp32_weight_bytes / 1e9, 100 * STORAGE_SHARE, budget / 1e9)
    else:
        narrow = _NAMES[weight_dtype]
    out = {}
    for stage, c in compute.items():
        narrower = narrow is not None and torch.finfo(narrow).bits < torch.finfo(c).bits
        out[stage] = narrow if narrower and stage in NARROW_STAGES else c
    return out


def retarget_storage(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Make ``module.to(dtype)`` leave one consistent model after ``apply_storage``: every layerwise-casting hook now
    stores and computes in ``dtype`` (diffusers cannot remove them) and the compute-dtype mark goes, so weights,
    compute and activations all agree (A1111 moves a CPU-loaded pipeline to ``cuda, fp16``)."""
    module.__dict__.pop("_headsup_compute_dtype", None)
    for sub in module.modules():
        hooks = getattr(sub, "_diffusers_hook", None)
        hook = hooks.get_hook("layerwise_casting") if hooks is not None else None
        if hook is not None:
            hook.storage_dtype = hook.compute_dtype = dtype
        sub.__dict__.pop("_headsup_compute_dtype", None)


def apply_storage(module: torch.nn.Module, storage: torch.dtype, compute: torch.dtype) -> None:
    """Keep ``module``'s Conv/Linear weights in ``storage`` and cast each layer to ``compute`` for its own forward
    (diffusers' layerwise casting, one hook per layer); every other parameter (norms: small) and, when storage
    equals compute, every parameter is brought to ``compute``. With narrower storage the compute dtype is recorded
    on the module (``model.compute_dtype_of``), else the parameters' dtype says it (and follows ``.to``). Where diffusers lacks layerwise casting, the weights stay in ``compute``."""
    module.__dict__.pop("_headsup_compute_dtype", None)
    if storage != compute:
        module._headsup_compute_dtype = compute  # params say storage; inputs must be cast to compute
        try:
            from diffusers.hooks import apply_layerwise_casting
        except ImportError:
            log.warning("HeadsUp: this diffusers has no layerwise casting (needs >= 0.33); weights stay in %s.",
                        str(compute).replace("torch.", ""))
            del module._headsup_compute_dtype
        else:
            apply_layerwise_casting(module, storage_dtype=storage, compute_dtype=compute, skip_modules_pattern=None,
                                    skip_modules_classes=(torch.nn.GroupNorm, torch.nn.LayerNorm))
    for sub in module.modules():  # p.data, not Module.to: no diffusers "keep in float32" notice, hooks untouched
        hooks = getattr(sub, "_diffusers_hook", None)
        if hooks is not None and hooks.get_hook("layerwise_casting") is not None:
            continue
        for p in sub.parameters(recurse=False):
            if p.dtype != compute:
                p.data = p.data.to(compute)
