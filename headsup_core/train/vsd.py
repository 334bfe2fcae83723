"""Variational score distillation (VSD) with a regulariser LoRA UNet, as OSEDiff's ``OSEDiff_reg``.

OSEDiff keeps two extra SD UNets: ``unet_fix`` (frozen pretrained) and ``unet_update`` (the same UNet with
trainable LoRA). Here one copy serves both: with the adapter switched off (diffusers' ``disable_adapters``) it
gives the frozen prediction, with the ``reg`` adapter on the updated one -- the same numbers with one UNet less
in memory.

* ``distribution_matching_loss`` (generator step): t ~ U[20, 980), noise the generator's x0 latent, predict x0
  with both UNets (the frozen one with classifier-free guidance ``cfg``), and pull the latent along
  ``(x0_update - x0_fix) / mean|z - x0_fix|`` via ``mse(z, (z - grad).detach())``.
* ``diff_loss`` (regulariser step): the LoRA UNet learns the generator's output distribution with the ordinary
  denoising loss on detached latents, t ~ U[0, 1000).
v-prediction bases are handled by converting predictions/targets with the scheduler's formulas.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

REG_ADAPTER = "reg"


def alphas_cumprod_from_config(scheduler_config: dict | None = None) -> torch.Tensor:
    """ᾱ_t of the base's DDPM schedule (diffusers' own DDPMScheduler; SD2's config when none is given)."""
    import json
    from importlib import resources

    from diffusers import DDPMScheduler

    if scheduler_config is None:
        scheduler_config = json.loads(resources.files("headsup_core").joinpath(
            "configs/sd2/scheduler/scheduler_config.json").read_text())
    return DDPMScheduler.from_config(scheduler_config).alphas_cumprod.clone().float()


class VSDRegulariser(nn.Module):
    def __init__(self, base_unet: nn.Module, rank: int = 4, prediction_type: str = "epsilon",
                 alphas_cumprod: torch.Tensor | None = None, cfg: float = 7.5,
                 t_range: tuple[int, int] = (20, 980), gradient_checkpointing: bool = False):
        super().__init__()
        from ..loading.surgery import add_adapters, osediff_unet_targets

        self.unet = copy.deepcopy(base_unet)
        self.unet.requires_grad_(False)
        enc, dec, others = osediff_unet_targets(self.unet)
        # one adapter over OSEDiff's three target groups (same rank and alpha, so the same function)
        add_adapters(self.unet, {REG_ADAPTER: list(enc) + list(dec) + list(others)}, rank)
        for p in self.lora_parameters():
            p.requires_grad_(True)
        if gradient_checkpointing and hasattr(self.unet, "enable_gradient_checkpointing"):
            self.unet.enable_gradient_checkpointing()
        ac = alphas_cumprod if alphas_cumprod is not None else alphas_cumprod_from_config()
        self.register_buffer("alphas_cumprod", ac.float(), persistent=False)
        self.prediction_type, self.cfg, self.t_range = prediction_type, cfg, t_range

    def lora_parameters(self):
        return [p for n, p in self.unet.named_parameters() if "lora_" in n]

    # ---------------------------------------------------------------- schedule helpers
    def _a(self, t, like):
        return self.alphas_cumprod.to(like.device, like.dtype)[t].view(-1, 1, 1, 1)

    def add_noise(self, z, noise, t):
        a = self._a(t, z)
        return a.sqrt() * z + (1 - a).sqrt() * noise

    def to_x0(self, pred, z_t, t):
        a = self._a(t, z_t)
        if self.prediction_type == "v_prediction":
            return a.sqrt() * z_t - (1 - a).sqrt() * pred
        return (z_t - (1 - a).sqrt() * pred) / a.sqrt()  # OSEDiff's eps_to_mu

    def _target(self, z, noise, t):
        if self.prediction_type == "v_prediction":
            a = self._a(t, z)
            return a.sqrt() * noise - (1 - a).sqrt() * z
        return noise

    def _unet(self, z, t, emb):
        return self.unet(z, t, encoder_hidden_states=emb).sample

    # ---------------------------------------------------------------- losses
    def distribution_matching_loss(self, latents, prompt_embeds, neg_prompt_embeds, generator=None):
        b = latents.shape[0]
        dev = latents.device
        t = torch.randint(self.t_range[0], self.t_range[1], (b,), device="cpu", generator=generator).to(dev)
        noise = torch.randn(latents.shape, generator=generator, device="cpu").to(latents)
        z_t = self.add_noise(latents, noise, t)
        dtype = next(self.unet.parameters()).dtype
        emb, neg = prompt_embeds.expand(b, -1, -1), neg_prompt_embeds.expand(b, -1, -1)
        with torch.no_grad():
            x0_update = self.to_x0(self._unet(z_t.to(dtype), t, emb.to(dtype)).float(), z_t, t)
            self.unet.disable_adapters()  # the frozen pretrained UNet (OSEDiff's unet_fix)
            try:
                pred = self._unet(torch.cat([z_t] * 2).to(dtype), torch.cat([t] * 2),
                                  torch.cat([neg, emb]).to(dtype)).float()
            finally:
                self.unet.enable_adapters()
            uncond, cond = pred.chunk(2)
            x0_fix = self.to_x0(uncond + self.cfg * (cond - uncond), z_t, t)
        weight = (latents - x0_fix).abs().mean(dim=[1, 2, 3], keepdim=True)
        grad = (x0_update - x0_fix) / weight
        return F.mse_loss(latents.float(), (latents - grad).detach().float())

    def diff_loss(self, latents, prompt_embeds, generator=None):
        latents, prompt_embeds = latents.detach(), prompt_embeds.detach()
        b = latents.shape[0]
        n = self.alphas_cumprod.shape[0]
        noise = torch.randn(latents.shape, generator=generator, device="cpu").to(latents)
        t = torch.randint(0, n, (b,), device="cpu", generator=generator).to(latents.device)
        z_t = self.add_noise(latents, noise, t)
        dtype = next(self.unet.parameters()).dtype
        pred = self._unet(z_t.to(dtype), t, prompt_embeds.expand(b, -1, -1).to(dtype))
        return F.mse_loss(pred.float(), self._target(latents, noise, t).float())

    def forward(self, latents, prompt_embeds):
        """The regulariser's own training loss (so a DDP-wrapped module runs it through ``forward``)."""
        return self.diff_loss(latents, prompt_embeds)
