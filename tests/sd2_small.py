"""A small SD2-shaped single-file base that ComfyUI's own CheckpointLoaderSimple accepts, plus HeadsUp weights.

ComfyUI recognises SD2 by the UNet's widths (320 channels, context_dim 1024, linear transformer projections)
and builds the VAE and CLIP-H with SD2's fixed shapes, so tiny random models do not load through it. This
keeps SD2's widths with fewer UNet blocks (2 levels, 1 resnet each), the real SD2 VAE shape, and (optionally)
the real OpenCLIP-H text tower in SD2's LDM layout (``cond_stage_model.model.*``). Weights are random and
stored in fp16 (~0.95 GB with CLIP, ~0.25 GB without). The diffusers configs ride in the file's metadata
(as ``headsup make-tiny`` does), so headsup_core's single-file loader reads the same file.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SMALL_SD2_UNET = {
    "block_out_channels": [320, 640], "layers_per_block": 1, "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "in_channels": 4, "out_channels": 4,
    "sample_size": 64, "norm_num_groups": 32, "use_linear_projection": True, "flip_sin_to_cos": True,
    "freq_shift": 0,
}
CLIP_H = dict(width=1024, layers=24, heads=16, vocab=49408, ctx=77, mlp=4096)


def _sd2_vae_config() -> dict:
    from headsup_core.loading.base import CONFIG_DIR

    cfg = json.loads((CONFIG_DIR / "sd2" / "vae" / "config.json").read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _openclip_h(gen: torch.Generator, std: float = 0.02) -> dict[str, torch.Tensor]:
    c, p = CLIP_H, "cond_stage_model.model."
    w = c["width"]

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen) * std).half()

    sd = {p + "token_embedding.weight": rnd(c["vocab"], w), p + "positional_embedding": rnd(c["ctx"], w),
          p + "ln_final.weight": torch.ones(w).half(), p + "ln_final.bias": torch.zeros(w).half(),
          p + "text_projection": rnd(w, w), p + "logit_scale": torch.tensor(4.6).half()}
    for i in range(c["layers"]):
        b = f"{p}transformer.resblocks.{i}."
        sd.update({b + "ln_1.weight": torch.ones(w).half(), b + "ln_1.bias": torch.zeros(w).half(),
                   b + "ln_2.weight": torch.ones(w).half(), b + "ln_2.bias": torch.zeros(w).half(),
                   b + "attn.in_proj_weight": rnd(3 * w, w), b + "attn.in_proj_bias": torch.zeros(3 * w).half(),
                   b + "attn.out_proj.weight": rnd(w, w), b + "attn.out_proj.bias": torch.zeros(w).half(),
                   b + "mlp.c_fc.weight": rnd(c["mlp"], w), b + "mlp.c_fc.bias": torch.zeros(c["mlp"]).half(),
                   b + "mlp.c_proj.weight": rnd(w, c["mlp"]), b + "mlp.c_proj.bias": torch.zeros(w).half()})
    return sd


def write_sd2_small(folder: str | Path, with_clip: bool = True, seed: int = 0) -> dict[str, Path]:
    """Write ``base_sd2.safetensors`` (UNet + VAE [+ CLIP-H]) and ``headsup_sd2.safetensors`` into ``folder``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file

    from headsup_core.loading.base import TINY_CONFIG_KEY
    from headsup_core.loading.surgery import add_osediff_adapters, widen_conv_in
    from headsup_core.loading.weights import save_headsup_checkpoint
    from headsup_core.testing.tiny_models import _randomise_lora, unet_to_ldm, vae_to_ldm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vae_cfg = _sd2_vae_config()

    def models():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SMALL_SD2_UNET).eval()
        with torch.no_grad():  # a gentle random eps, so the one-step x0 is not pure saturation
            unet.conv_out.weight.mul_(0.05)
            unet.conv_out.bias.zero_()
        return unet, AutoencoderKL(**vae_cfg).eval()

    unet, vae = models()
    sd = {**unet_to_ldm(unet.state_dict(), SMALL_SD2_UNET), **vae_to_ldm(vae.state_dict(), vae_cfg)}
    sd = {k: v.detach().half().contiguous() for k, v in sd.items()}
    if with_clip:
        sd.update(_openclip_h(torch.Generator().manual_seed(seed + 10)))
    meta = {TINY_CONFIG_KEY: json.dumps({"unet": dict(unet.config), "vae": dict(vae.config)}),
            "prediction_type": "epsilon"}
    base = folder / "base_sd2.safetensors"
    save_file(sd, str(base), metadata=meta)
    del sd

    h_unet, h_vae = models()
    # Start from exactly what the base file holds (fp16), as a LoRA trained on that base would.
    for module in (h_unet, h_vae):
        with torch.no_grad():
            for prm in module.parameters():
                prm.copy_(prm.half().float())
    widen_conv_in(h_unet, 9)
    gen = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        h_unet.conv_in.weight[:, 4:] = torch.randn(h_unet.conv_in.weight[:, 4:].shape, generator=gen) * 0.02
        h_unet.conv_in.weight[:, :4] += torch.randn(h_unet.conv_in.weight[:, :4].shape, generator=gen) * 0.01
    add_osediff_adapters(h_unet, h_vae, 4, 4)
    _randomise_lora(h_unet, seed + 4, std=0.01)
    _randomise_lora(h_vae, seed + 5, std=0.01)
    embeds = torch.randn(1, 77, 1024, generator=torch.Generator().manual_seed(seed + 6))
    weights = save_headsup_checkpoint(folder / "headsup_sd2.safetensors", h_unet, h_vae,
                                      {"note": "small SD2-shaped random test weights"}, prompt_embeds=embeds)
    return {"base": base, "weights": Path(weights)}
