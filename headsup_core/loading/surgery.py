"""Model surgery: LoRA placement (OSEDiff's exact target selection) and merging through peft, conv_in widening.

OSEDiff puts rank-4 LoRA on every conv/attention/feed-forward weight of the UNet, split into three adapters
(``default_encoder`` for down blocks and ``conv_in``, ``default_decoder`` for up blocks and ``conv_out``,
``default_others`` for the rest), and one adapter on the VAE encoder including ``quant_conv``. The selection
below reproduces its name matching exactly, so an OSEDiff ``.pkl`` loads key for key.
"""
from __future__ import annotations

import torch

from ..errors import WeightsError

UNET_PATTERNS = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut",
                 "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj"]
VAE_PATTERNS = ["conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0"]
UNET_ADAPTERS = ("default_encoder", "default_decoder", "default_others")
VAE_ADAPTER = "default_encoder"
DEFAULT_LORA_ALPHA = 8.0  # peft's default, which OSEDiff relies on (scaling = alpha / rank)


def _base_name(param_name: str) -> str:
    # Names of already-adapted modules carry peft's ".base_layer"; targets are the wrapping module.
    return param_name.replace(".base_layer", "").replace(".weight", "")


def osediff_unet_targets(unet: torch.nn.Module) -> tuple[list[str], list[str], list[str]]:
    """(encoder, decoder, others) module names, selected exactly as OSEDiff's ``initialize_unet``."""
    encoder, decoder, others = [], [], []
    for name, _ in unet.named_parameters():
        if "bias" in name or "norm" in name or "lora_" in name:
            continue
        for pattern in UNET_PATTERNS:
            if pattern in name and ("down_blocks" in name or "conv_in" in name):
                encoder.append(_base_name(name))
                break
            if pattern in name and ("up_blocks" in name or "conv_out" in name):
                decoder.append(_base_name(name))
                break
            if pattern in name:
                others.append(_base_name(name))
                break
    return encoder, decoder, others


def osediff_vae_targets(vae: torch.nn.Module) -> list[str]:
    """VAE encoder module names, selected as OSEDiff's ``initialize_vae`` (duplicates removed, order kept)."""
    targets: list[str] = []
    for name, _ in vae.named_parameters():
        if "bias" in name or "norm" in name or "lora_" in name:
            continue
        for pattern in VAE_PATTERNS:
            if (pattern in name and "encoder" in name) or ("quant_conv" in name and "post_quant_conv" not in name):
                targets.append(_base_name(name))
    return list(dict.fromkeys(targets))


def _lora_config(rank: int, targets: list[str], alpha: float | None = None):
    from peft import LoraConfig

    return LoraConfig(r=int(rank), lora_alpha=DEFAULT_LORA_ALPHA if alpha is None else float(alpha),
                      init_lora_weights="gaussian", target_modules=list(targets))


def add_adapters(model, groups: dict[str, list[str]], rank: int, alpha: float | None = None) -> None:
    """Add one peft LoRA adapter per group (adapter name -> target module names) and activate them all."""
    import warnings

    names = []
    for adapter_name, targets in groups.items():
        if not targets:
            continue
        with warnings.catch_warnings():
            # Several adapters on one model is OSEDiff's layout, not a mistake: silence peft's warning about it.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            model.add_adapter(_lora_config(rank, targets, alpha), adapter_name=adapter_name)
        names.append(adapter_name)
    if names:
        model.set_adapter(names)


def add_osediff_adapters(unet, vae, rank_unet: int = 4, rank_vae: int = 4,
                         alpha_unet: float | None = None, alpha_vae: float | None = None) -> dict:
    """Put OSEDiff-style adapters on ``unet`` and ``vae``; returns the target lists (for checkpoint metadata)."""
    enc, dec, oth = osediff_unet_targets(unet)
    vae_targets = osediff_vae_targets(vae)
    add_adapters(unet, dict(zip(UNET_ADAPTERS, (enc, dec, oth))), rank_unet, alpha_unet)
    add_adapters(vae, {VAE_ADAPTER: vae_targets}, rank_vae, alpha_vae)
    return {"unet_encoder": enc, "unet_decoder": dec, "unet_others": oth, "vae_encoder": vae_targets}


@torch.no_grad()
def merge_adapters(model: torch.nn.Module) -> int:
    """Fold every LoRA adapter into its base weight and put the plain base layer back (inference speed).

    Uses peft's own ``merge`` so the maths (scaling, conv kernels, fan-in/out) is peft's. Returns the number of
    layers merged.
    """
    from peft.tuners.lora import LoraLayer

    wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    for name, module in wrapped:
        adapters = list(module.lora_A.keys())
        module.merge(safe_merge=False, adapter_names=adapters)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    # diffusers keeps a flag that adapters are loaded; clear it so the model is a plain model again.
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = False
    if hasattr(model, "peft_config"):
        try:
            del model.peft_config
        except AttributeError:
            pass
    return len(wrapped)


@torch.no_grad()
def widen_conv_in(unet, in_channels: int = 9) -> None:
    """Give the UNet's ``conv_in`` extra input channels, zero-initialised so the old behaviour is unchanged."""
    old = unet.conv_in
    if old.in_channels == in_channels:
        return
    if old.in_channels > in_channels:
        raise WeightsError(f"The UNet already has {old.in_channels} input channels (> {in_channels}).")
    new = torch.nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                          device=old.weight.device, dtype=old.weight.dtype)
    new.weight.zero_()
    new.weight[:, : old.in_channels] = old.weight
    new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)
