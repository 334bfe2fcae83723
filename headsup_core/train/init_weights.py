"""``init_weights`` of a training run: an OSEDiff ``.pkl`` or a HeadsUp ``.safetensors`` to start from."""
from __future__ import annotations

from pathlib import Path

import torch


def load_init(path, out_dir):
    """The weights at ``path`` (None when unset); an OSEDiff .pkl is converted first (its conv_in LoRA merged and
    conv_in widened) into ``out_dir``/init_from_osediff.safetensors."""
    from ..loading.weights import convert_osediff, load_weights

    if not path:
        return None
    if not str(path).endswith(".safetensors"):
        path = convert_osediff(path, Path(out_dir) / "init_from_osediff.safetensors")
    return load_weights(path)


def apply_init(unet, vae, w) -> None:
    """Copy loaded weights into the peft-adapted training modules (strict: unknown or mis-shaped keys raise)."""
    from ..loading.weights import load_tensors_into

    with torch.no_grad():
        lora = {k: v for k, v in w.unet_state.items() if k not in ("conv_in.weight", "conv_in.bias")}
        own = dict(unet.named_parameters())
        for k in [k for k in own if k.startswith("conv_in.lora_")]:
            lora.setdefault(k, own[k].detach().clone())  # conv_in's own LoRA starts fresh (B = 0)
        load_tensors_into(unet, lora, "UNet", w.path)
        unet.conv_in.base_layer.weight.copy_(w.unet_state["conv_in.weight"])
        unet.conv_in.base_layer.bias.copy_(w.unet_state["conv_in.bias"])
        load_tensors_into(vae, w.vae_state, "VAE", w.path)
