"""Our one-step output equals a straightforward re-implementation of OSEDiff's inference on the same .pkl.

The reference below follows OSEDiff's ``OSEDiff_test`` step by step and shares no code with headsup_core:
peft adapters are added with diffusers' ``add_adapter`` under OSEDiff's adapter names and left *unmerged*,
tensors are copied by parameter name, and x0 comes from diffusers' ``DDPMScheduler.step`` with one timestep
(rather than our closed-form update). The only deliberate difference is the latent: the posterior mode, which
is HeadsUp's deterministic default (OSEDiff samples it).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig

from headsup_core import HeadsUpPipeline


def _osediff_reference(base_dir, pkl_path, lq: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
    model = torch.load(pkl_path, map_location="cpu", weights_only=True)
    unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(base_dir, subfolder="vae")
    scheduler = DDPMScheduler.from_pretrained(base_dir, subfolder="scheduler")
    scheduler.set_timesteps(timesteps=[999])  # one step at t=999, as OSEDiff; prev step is t=-1 (ᾱ=1)

    for adapter, key in (("default_encoder", "unet_lora_encoder_modules"),
                         ("default_decoder", "unet_lora_decoder_modules"),
                         ("default_others", "unet_lora_others_modules")):
        unet.add_adapter(LoraConfig(r=model["rank_unet"], init_lora_weights="gaussian", target_modules=model[key]),
                         adapter_name=adapter)
    for n, p in unet.named_parameters():
        if "lora" in n or "conv_in" in n:
            p.data.copy_(model["state_dict_unet"][n])
    unet.set_adapter(["default_encoder", "default_decoder", "default_others"])
    vae.add_adapter(LoraConfig(r=model["rank_vae"], init_lora_weights="gaussian",
                               target_modules=model["vae_lora_encoder_modules"]), adapter_name="default_encoder")
    for n, p in vae.named_parameters():
        if "lora" in n:
            p.data.copy_(model["state_dict_vae"][n])
    vae.set_adapter(["default_encoder"])

    timesteps = torch.tensor([999]).long()
    with torch.no_grad():
        lq_latent = vae.encode(lq).latent_dist.mode() * vae.config.scaling_factor
        model_pred = unet(lq_latent, timesteps, encoder_hidden_states=prompt_embeds).sample
        x_denoised = scheduler.step(model_pred, timesteps, lq_latent, return_dict=True).prev_sample
        return vae.decode(x_denoised / vae.config.scaling_factor).sample.clamp(-1, 1)


def test_one_step_output_matches_osediff_reference(tiny_models):
    torch.manual_seed(0)
    # The bicubic upscale happens before the model in both; feed the already-upscaled image at scale 1.
    small = torch.rand(1, 3, 16, 24)
    up = F.interpolate(small, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    embeds = torch.randn(1, 77, 32)

    reference = _osediff_reference(tiny_models["base"], tiny_models["osediff"], up * 2 - 1, embeds)
    reference = (reference + 1) / 2

    pipe = HeadsUpPipeline.from_files(tiny_models["base"], tiny_models["osediff"], device="cpu", dtype="fp32")
    ours = pipe.upscale(up.permute(0, 2, 3, 1), scale=1.0, color_fix="none", prompt_embeds=embeds,
                        tile_size=4096)
    ours = ours.permute(0, 3, 1, 2)
    assert ours.shape == reference.shape
    diff = (ours - reference).abs().max().item()
    assert diff < 1e-4, f"max abs difference {diff}"
    # And the model is not a no-op: the output differs clearly from its input.
    assert (ours - up).abs().mean().item() > 1e-2


def _osediff_text_embeds(base_dir, prompt: str) -> torch.Tensor:
    """OSEDiff's ``encode_prompt``: the diffusers folder's own tokenizer and text encoder, no headsup code."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(base_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base_dir, subfolder="text_encoder")
    ids = tokenizer(prompt, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


@pytest.mark.parametrize("single", ["base_single", "base_sgm"])
@pytest.mark.parametrize("prompt", [None, "a man"])
def test_single_file_with_its_text_encoder_matches_osediff(tiny_models, single, prompt):
    """On each single-file layout (LDM, sgm), with no prompt our output is OSEDiff's with the prompt ", ,"
    (OSEDiff's f"{tags}, {prompt}," with no tags), and with a prompt P it is OSEDiff's with ", P,"."""
    torch.manual_seed(1)
    up = F.interpolate(torch.rand(1, 3, 16, 24), scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    osediff_text = f", {prompt}," if prompt else ", ,"
    embeds = _osediff_text_embeds(tiny_models["base"], osediff_text)
    reference = (_osediff_reference(tiny_models["base"], tiny_models["osediff"], up * 2 - 1, embeds) + 1) / 2

    pipe = HeadsUpPipeline.from_files(tiny_models[single], tiny_models["osediff"], device="cpu", dtype="fp32")
    ours = pipe.upscale(up.permute(0, 2, 3, 1), scale=1.0, color_fix="none", prompt=prompt, tile_size=4096)
    diff = (ours.permute(0, 3, 1, 2) - reference).abs().max().item()
    assert diff < 1e-4, f"max abs difference {diff}"
    # The conditioning matters: with an all-zero embedding the output is clearly different.
    zero = pipe.upscale(up.permute(0, 2, 3, 1), scale=1.0, color_fix="none", prompt_embeds=torch.zeros(1, 77, 32),
                        tile_size=4096)
    assert (zero - ours).abs().max().item() > 1e-3


def test_alpha_bar_999_matches_sd_schedule():
    from headsup_core.model import alpha_bar

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert abs(alpha_bar(999) - 0.0046601) < 1e-6
    assert abs(alpha_bar(999) - float(scheduler.alphas_cumprod[999])) < 1e-7
    assert np.isclose(alpha_bar(0), 1 - 0.00085, atol=1e-9)
