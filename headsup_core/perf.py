"""Per-stage number and memory formats, chosen by measurement (bench/precision.py; docs/benchmark.md).

CPU, when the dtype is left on auto:
* channels_last for the UNet and the VAE (fp32 channels_last is 80 dB from contiguous fp32: rounding only; the
  UNet runs about 2x faster, the VAE stages 5-15%);
* the stages precision.py puts in bf16 (the VAE decoder on CPUs with native bf16; ``HEADSUP_CPU_BF16`` overrides), the
  encoder, the UNet and the x0 update in fp32; the measurements behind that choice are in precision.py;
* the VAE decoder's nearest-x2 + 3x3 conv upsamplers run polyphase (``headsup_core/upsample.py``: exact, 4/9 of
  the MACs; bench/upsample.py, ~2x per upsampler at the decoder's shapes). Not the UNet's: at its shapes (1280
  channels, 8-32 px) it measured no faster and its derived kernels would hold ~240 MB more. Any dtype.
Which stages run in bf16 is decided in precision.py (the one precision home); this module applies it.
"""
from __future__ import annotations

import logging

import torch

from .precision import ENV_BF16, cpu_bf16_stages
from .upsample import patch_upsamplers

log = logging.getLogger("headsup")


def apply_cpu_defaults(model, device: torch.device, dtype_requested=None) -> dict:
    """Apply the measured CPU formats to a diffusers-backed ``HeadsUpModel`` on ``device``; returns what was
    chosen. Does nothing on other devices or when the user named a dtype (then every stage uses it)."""
    chosen: dict = {}
    if torch.device(device).type != "cpu":
        return chosen
    for part in (model.unet, model.vae):
        part.to(memory_format=torch.channels_last)
    chosen["channels_last"] = True
    chosen["polyphase_upsample"] = patch_upsamplers(model.vae.decoder)  # exact in any dtype, so always
    if dtype_requested not in (None, "auto"):
        return chosen
    for stage in cpu_bf16_stages():
        for module in model.stage_modules(stage):
            module.to(torch.bfloat16)
        chosen[stage] = "bf16"
    if chosen.get("unet") == "bf16":
        log.warning("HeadsUp: the UNet runs in bf16 (%s): about 28 dB from fp32 at 1024², visibly different.",
                    ENV_BF16)
    return chosen


def compile_unet(model, **kwargs):
    """Wrap the UNet in ``torch.compile`` (an option, off by default: compiling costs tens of seconds per tile
    shape and pays only over many images of one size). Attribute access passes through to the module."""
    model.unet = torch.compile(model.unet, **kwargs)
    return model
