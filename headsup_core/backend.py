"""``Backend``: what the engine (pipeline.py, stages.py) and the planner need from a model, written down once.

Two implementations: ``model.HeadsUpModel`` (diffusers modules loaded by HeadsUp) and
``nodes.comfy_model.ComfyHeadsUpModel`` (the ComfyUI graph's own patched MODEL and VAE). The engine calls these
members and nothing else; it never probes a model with getattr/hasattr.

Policy layer: an interface only (no imports from the package).
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch


@runtime_checkable
class Backend(Protocol):
    vae: torch.nn.Module            # has .encoder and .decoder (their GroupNorms are shared across fast tiles)
    unet: torch.nn.Module           # the denoiser; the planner counts its progress units (planner.progress_units)
    vae_scale: int                  # output pixels per latent unit
    scaling_factor: float
    sample_latent: bool             # sample the posterior (with the request's seed) instead of its mode
    default_prompt_embeds: torch.Tensor

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def in_channels(self) -> int: ...

    @property
    def cross_attention_dim(self) -> int: ...

    @property
    def conditioning_in_use(self) -> dict[str, bool]:
        """{"reference": bool, "mask": bool}: whether the weights react to a reference / the face mask."""

    @property
    def pixel_multiple(self) -> int:
        """Output pixels an image is padded to a multiple of (the UNet's downsamplings)."""

    @property
    def supports_exact_vae(self) -> bool:
        """Whether the exact lockstep tiles (tiled_vae.py) can run this VAE (diffusers' AutoencoderKL, ComfyUI's
        own SD VAE modules); False: the plan uses blended ("fast") VAE tiles."""

    def compute_dtype(self, stage: str) -> torch.dtype:
        """The dtype ``stage`` ("encoder", "unet", "decoder") computes in (not its weights' storage dtype)."""

    def fp32_retry(self, stage: str, fn: Callable, what: str = "this tile") -> Callable:
        """``fn`` wrapped so a non-finite half-precision output of ``stage`` is recomputed in fp32 (or ``fn``
        itself where the host owns precision)."""

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Image in [-1, 1] -> scaled latent."""

    def latent_from_moments(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Posterior moments (the exact tiled encoder's output) -> scaled latent, as ``encode`` takes it."""

    def predict_x0(self, unet_input: torch.Tensor, lq_latent: torch.Tensor, prompt_embeds: torch.Tensor,
                   strength: float = 1.0) -> torch.Tensor:
        """The one step: UNet input (LQ latent ⊕ conditioning) -> x0 latent."""

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> image in [-1, 1]."""
