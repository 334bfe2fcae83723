"""Apply the dtypes precision.py decides: each stage's weights kept in their storage dtype and, when that is
narrower than the compute dtype, cast per layer for its own forward (diffusers' layerwise casting).

Which dtype each stage computes in and stores in is precision.py's decision (``compute_dtypes``,
``storage_dtypes``); this module only changes modules. The VAE (0.3 GB in fp32) always keeps its compute dtype:
diffusers' decoder casts its activations to its weights' dtype, so narrower storage would break it.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("headsup")


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
