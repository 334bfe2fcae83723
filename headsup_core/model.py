"""The HeadsUp model maths: one-step x0 prediction on an SD2.x UNet with face-aware conditioning.

Kept free of loading and of tiling (diffusers' split between model math, loading and pipeline):
``HeadsUpModel`` holds the VAE and the UNet (LoRA already merged) and does one encode, one UNet call and one
decode on whatever tensor it is given. Tiling lives in ``tiling.py``, orchestration in ``pipeline.py``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .precision import retry_in_fp32
from .tiled_vae import supports_exact

LQ_CHANNELS = 4
COND_CHANNELS = 9  # LQ latent (4) ⊕ reference latent (4) ⊕ face mask (1)


def alpha_bar(timestep: int, beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000) -> float:
    """ᾱ_t for SD's scaled-linear schedule (float64), e.g. ᾱ_999 = 0.0046601."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    return float(torch.cumprod(1.0 - betas, 0)[timestep])


def compute_dtype_of(module: torch.nn.Module) -> torch.dtype:
    """The dtype ``module`` computes in: its weights' dtype, unless its weights are stored narrower and cast per
    layer (loading/dtypes.py ``apply_storage`` records the compute dtype)."""
    return getattr(module, "_headsup_compute_dtype", None) or next(module.parameters()).dtype


def assemble_unet_input(lq_latent: torch.Tensor, ref_latent: torch.Tensor | None = None,
                        face_mask: torch.Tensor | None = None, in_channels: int = COND_CHANNELS) -> torch.Tensor:
    """LQ latent ⊕ reference latent ⊕ face mask along channels, zeros where absent.

    Shared by inference and training so both build exactly the same input. ``face_mask`` is at latent
    resolution (Bx1xhxw). A UNet with only 4 input channels (plain OSEDiff) gets the LQ latent alone.
    """
    if in_channels == LQ_CHANNELS:
        return lq_latent
    b, c, h, w = lq_latent.shape
    zeros = lq_latent.new_zeros
    ref = ref_latent if ref_latent is not None else zeros(b, c, h, w)
    mask = face_mask if face_mask is not None else zeros(b, 1, h, w)
    if ref.shape != lq_latent.shape or mask.shape != (b, 1, h, w):
        raise ValueError(f"conditioning shapes {tuple(ref.shape)}, {tuple(mask.shape)} do not fit {tuple(lq_latent.shape)}")
    out = torch.cat([lq_latent, ref.to(lq_latent.dtype), mask.to(lq_latent.dtype)], 1)
    if out.shape[1] != in_channels:
        raise ValueError(f"the UNet expects {in_channels} input channels, the conditioning has {out.shape[1]}")
    return out


def conditioning_in_use(conv_in_weight: torch.Tensor | None) -> dict[str, bool]:
    """Which extra ``conv_in`` inputs the weights react to. Input channels whose weights are all zero (OSEDiff's
    widened conv_in, or any checkpoint whose reference/mask channels were never trained) cannot change the output,
    so the reference work (matching, canvas, VAE encode) or the face mask can be skipped for them."""
    if conv_in_weight is None or conv_in_weight.shape[1] <= LQ_CHANNELS:
        return {"reference": False, "mask": False}
    w = conv_in_weight.detach()
    ref, mask = w[:, LQ_CHANNELS:2 * LQ_CHANNELS], w[:, 2 * LQ_CHANNELS:]
    return {"reference": ref.numel() > 0 and bool(ref.abs().amax() > 0),
            "mask": mask.numel() > 0 and bool(mask.abs().amax() > 0)}


def mask_to_latent(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Pixel-resolution soft mask Bx1xHxW -> latent resolution by area averaging."""
    return F.interpolate(mask.float(), size=latent_hw, mode="area")


class HeadsUpModel(torch.nn.Module):
    """VAE + UNet with merged LoRA, and the one-step update of OSEDiff (DESIGN §1 steps 2-5). A ``Backend``
    (backend.py)."""

    retry_in_fp32 = True  # a 16-bit stage with NaN/Inf output is recomputed in fp32 (precision.retry_in_fp32)

    def __init__(self, vae, unet, prediction_type: str = "epsilon", timestep: int = 999,
                 prompt_embeds: torch.Tensor | None = None, sample_latent: bool = False, metadata: dict | None = None):
        super().__init__()
        self.vae = vae
        self.unet = unet
        self.prediction_type = prediction_type
        self.timestep = int(timestep)
        self.alpha_bar_t = alpha_bar(self.timestep)
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215))
        self.sample_latent = sample_latent
        self.metadata = dict(metadata or {})
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        embeds = prompt_embeds if prompt_embeds is not None else torch.zeros(1, 77, unet.config.cross_attention_dim)
        self.register_buffer("default_prompt_embeds", embeds.float().reshape(1, *embeds.shape[-2:]), persistent=False)

    @property
    def in_channels(self) -> int:
        conv = self.unet.conv_in
        return int(getattr(conv, "base_layer", conv).in_channels)  # a peft-wrapped conv_in during training

    @property
    def conditioning_in_use(self) -> dict[str, bool]:
        """{"reference": bool, "mask": bool}: whether conv_in's reference / mask input weights are non-zero."""
        conv = self.unet.conv_in
        if hasattr(conv, "base_layer"):  # training: the LoRA on conv_in can wake zero channels at any step
            return {"reference": self.in_channels > LQ_CHANNELS, "mask": self.in_channels > LQ_CHANNELS}
        return conditioning_in_use(conv.weight)

    @property
    def pixel_multiple(self) -> int:
        """Output pixels an input is padded to a multiple of: the VAE's factor times the UNet's downsamplings."""
        return self.vae_scale * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def supports_exact_vae(self) -> bool:
        return supports_exact(self.vae)

    def stage_modules(self, stage: str) -> list[torch.nn.Module]:
        """The modules of a stage (their dtype may differ per stage, see precision.py)."""
        vae = self.vae
        if stage == "unet":
            return [self.unet]
        if stage == "encoder":
            return [m for m in (vae.encoder, vae.quant_conv) if m is not None]
        return [m for m in (vae.decoder, vae.post_quant_conv) if m is not None]

    def compute_dtype(self, stage: str) -> torch.dtype:
        return {"unet": self.dtype, "encoder": self.encoder_dtype, "decoder": self.decoder_dtype}[stage]

    def fp32_retry(self, stage: str, fn, what: str = "this tile"):
        if not self.retry_in_fp32:
            return fn
        name = {"unet": "UNet"}.get(stage, stage)
        return retry_in_fp32(fn, name, self.compute_dtype(stage), self.stage_modules(stage), what)

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype_of(self.unet)

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def encoder_dtype(self) -> torch.dtype:
        """The VAE encoder's dtype (it may differ from the decoder's: per-stage precision, see perf.py)."""
        return compute_dtype_of(self.vae.encoder)

    @property
    def decoder_dtype(self) -> torch.dtype:
        return compute_dtype_of(self.vae.decoder)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Image in [-1, 1] -> scaled latent. Posterior mode by default (deterministic), or a sample."""
        dist = self.vae.encode(x.to(self.encoder_dtype)).latent_dist
        z = dist.sample(generator=generator) if self.sample_latent else dist.mode()
        return z * self.scaling_factor

    def latent_from_moments(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Posterior moments (the encoder + quant_conv output, e.g. assembled from exact VAE tiles) -> scaled
        latent, exactly as ``encode`` takes it from the distribution."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        dist = DiagonalGaussianDistribution(moments.float())
        z = dist.sample(generator=generator) if self.sample_latent else dist.mode()
        return z.float() * self.scaling_factor

    def predict_x0(self, unet_input: torch.Tensor, lq_latent: torch.Tensor, prompt_embeds: torch.Tensor,
                   strength: float = 1.0) -> torch.Tensor:
        """One UNet call at t=timestep, then x0 from the prediction (eps or v); ``strength`` < 1 blends toward
        the LQ latent (the fidelity ↔ detail control)."""
        b = unet_input.shape[0]
        t = torch.full((b,), self.timestep, device=unet_input.device, dtype=torch.long)
        embeds = prompt_embeds.to(device=unet_input.device, dtype=self.dtype)
        if embeds.shape[0] != b:
            embeds = embeds[:1].expand(b, -1, -1)
        pred = self.unet(unet_input.to(self.dtype), t, encoder_hidden_states=embeds).sample.float()
        z = lq_latent.float()
        a = self.alpha_bar_t
        if self.prediction_type == "v_prediction":
            x0 = math.sqrt(a) * z - math.sqrt(1 - a) * pred
        else:
            x0 = (z - math.sqrt(1 - a) * pred) / math.sqrt(a)
        if strength != 1.0:
            x0 = z + strength * (x0 - z)
        return x0

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> image in [-1, 1]."""
        return self.vae.decode(latent.to(self.decoder_dtype) / self.scaling_factor).sample.clamp(-1, 1)
