"""Per-stage number and memory formats, chosen by measurement (bench/precision.py; docs/benchmark.md).

CPU, when the dtype is left on auto:
* channels_last for the UNet and the VAE (fp32 channels_last is 80 dB from contiguous fp32: rounding only; the
  UNet runs about 2x faster, the VAE stages 5-15%);
* bf16 for the VAE (encoder and decoder), and only on CPUs with native bf16 (AVX512-BF16 or AMX, read from
  the CPU flags, never assumed): the stages whose bf16 output stays >= 40 dB PSNR from fp32. Measured on the
  SD2.1-size architecture (random weights), against the fp32 untiled output: decoder bf16 44.7 dB (512²);
  encoder and decoder bf16 41.5 dB (512²) and 40.8 dB (1024²); UNet bf16 28 dB (the one-step update multiplies
  eps errors ~14.6x), so the UNet stays fp32. The margin is thin and trained weights were not available to
  check it: ``HEADSUP_CPU_BF16=decoder`` keeps the encoder in fp32 (about 2x slower encode);
* the UNet and the x0 update stay fp32 (``HeadsUpModel.predict_x0`` computes x0 in fp32 anyway);
* the VAE decoder's nearest-x2 + 3x3 conv upsamplers run polyphase (``headsup_core/upsample.py``: exact, 4/9 of
  the MACs; bench/upsample.py, ~2x per upsampler at the decoder's shapes). Not the UNet's: at its shapes (1280
  channels, 8-32 px) it measured no faster and its derived kernels would hold ~240 MB more. Any dtype.
``HEADSUP_CPU_BF16`` overrides the bf16 stages: a comma list of ``encoder``, ``decoder``, ``unet``, or ``none``.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("headsup")
ENV_BF16 = "HEADSUP_CPU_BF16"
CPU_BF16_STAGES = ("encoder", "decoder")
STAGE_NAMES = ("encoder", "decoder", "unet")


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_native_bf16(flags: set[str] | None = None) -> bool:
    """AVX512-BF16 or AMX-BF16 in the CPU flags (Linux). Elsewhere unknown, so False: never assumed."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def cpu_bf16_stages(native: bool | None = None) -> tuple[str, ...]:
    env = os.environ.get(ENV_BF16)
    if env is not None:
        stages = tuple(s.strip() for s in env.lower().split(",") if s.strip() and s.strip() != "none")
        unknown = [s for s in stages if s not in STAGE_NAMES]
        if unknown:
            log.warning("HeadsUp: ignoring unknown stage(s) %s in %s (use encoder, decoder, unet or none).",
                        unknown, ENV_BF16)
        return tuple(s for s in stages if s in STAGE_NAMES)
    return CPU_BF16_STAGES if (cpu_native_bf16() if native is None else native) else ()


def stage_modules(model, stage: str) -> list[torch.nn.Module]:
    vae = model.vae
    if stage == "unet":
        return [model.unet]
    if stage == "encoder":
        return [m for m in (vae.encoder, getattr(vae, "quant_conv", None)) if m is not None]
    return [m for m in (vae.decoder, getattr(vae, "post_quant_conv", None)) if m is not None]


def apply_cpu_defaults(model, device: torch.device, dtype_requested=None) -> dict:
    """Apply the measured CPU formats to a diffusers-backed ``HeadsUpModel`` on ``device``; returns what was
    chosen. Does nothing on other devices or when the user named a dtype (then every stage uses it)."""
    chosen: dict = {}
    if torch.device(device).type != "cpu" or not hasattr(model, "vae"):
        return chosen
    for part in (model.unet, model.vae):
        part.to(memory_format=torch.channels_last)
    chosen["channels_last"] = True
    from .upsample import patch_upsamplers

    chosen["polyphase_upsample"] = patch_upsamplers(model.vae.decoder)  # exact in any dtype, so always
    if dtype_requested not in (None, "auto"):
        return chosen
    for stage in cpu_bf16_stages():
        for module in stage_modules(model, stage):
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
