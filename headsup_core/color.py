"""Colour correction of the SR output against the bicubic-upscaled input (DESIGN §1 step 6).

``adain`` matches each channel's mean and standard deviation; ``wavelet`` keeps the output's high-frequency
bands and takes the low-frequency band from the input (the dilated à-trous blur used by OSEDiff / StableSR).
Both act per channel on RGB, so neither rotates hues of the reference: a grey input stays grey.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .choices import COLOR_FIX_MODES  # noqa: F401 - the one list, re-exported here


def adain_color_fix(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-channel mean/std of ``content`` set to those of ``style`` (both Bx3xHxW, any range)."""
    dims = (-2, -1)
    c_mean, c_std = content.mean(dims, keepdim=True), content.std(dims, keepdim=True) + eps
    s_mean, s_std = style.mean(dims, keepdim=True), style.std(dims, keepdim=True) + eps
    return (content - c_mean) / c_std * s_std + s_mean


def _wavelet_blur(image: torch.Tensor, radius: int) -> torch.Tensor:
    kernel = torch.tensor([[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]],
                          dtype=image.dtype, device=image.device)
    channels = image.shape[1]
    kernel = kernel[None, None].repeat(channels, 1, 1, 1)
    # Replicate padding needs pad < size; reflect the smallest images by clamping the radius.
    pad = min(radius, image.shape[-2] - 1, image.shape[-1] - 1)
    if pad <= 0:
        return image
    padded = F.pad(image, (pad, pad, pad, pad), mode="replicate")
    return F.conv2d(padded, kernel, groups=channels, dilation=pad)


def _wavelet_decompose(image: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    high = torch.zeros_like(image)
    for i in range(levels):
        low = _wavelet_blur(image, 2 ** i)
        high += image - low
        image = low
    return high, image


def wavelet_color_fix(content: torch.Tensor, style: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Output's high-frequency bands + the input's lowest band."""
    content_high, _ = _wavelet_decompose(content, levels)
    _, style_low = _wavelet_decompose(style, levels)
    return content_high + style_low


def apply_color_fix(output: torch.Tensor, reference: torch.Tensor, mode: str) -> torch.Tensor:
    """Apply ``mode`` to images in 0..1 and clamp back to 0..1."""
    if mode == "none":
        return output
    if mode == "adain":
        return adain_color_fix(output, reference).clamp(0, 1)
    if mode == "wavelet":
        return wavelet_color_fix(output, reference).clamp(0, 1)
    raise ValueError(f"unknown colour fix {mode!r}; choose one of {', '.join(COLOR_FIX_MODES)}")
