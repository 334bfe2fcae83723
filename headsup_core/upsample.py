"""Polyphase nearest-x2 upsample + 3x3 conv (diffusers' ``Upsample2D``) for inference: exact, 4/9 of the MACs.

On a nearest-upsampled input the 3x3 conv (padding 1) is, per output phase (a, b) in {0, 1}², a 2x2 conv on the
low-resolution input: output row 2i+a reads low-res rows (i-1, i) with kernel rows (k0, k1+k2) for a=0 and
(i, i+1) with (k0+k1, k2) for a=1; columns likewise. The four 2x2 kernels are stacked into one conv with 4x the
output channels on the input padded by 1 pixel (output (H+1)x(W+1)); phase (a, b) is that output's group
(a, b) shifted by (a, b), and the phases are interleaved into the 2Hx2W result. 4 MACs per output pixel and
channel pair instead of 9; equal to the original up to float summation order (and, in bf16, one rounding of the
summed kernel taps). No HxW-sized upsampled copy of the input is made.

The derived kernels are cached on the module (not in its ``state_dict``), keyed on the conv weight's storage,
version counter, dtype and device, so ``.to(...)``, ``load_state_dict`` or in-place edits recompute them. With
gradients on for the weights, with a non-2x ``output_size``, or with the deprecated ``scale`` arguments, the
original forward runs. The patched module keeps its class's behaviour otherwise (its class becomes a subclass of
``Upsample2D``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .devices import version_counter

try:
    from diffusers.models.upsampling import Upsample2D
except ImportError:  # pragma: no cover - diffusers is a dependency of every model path that reaches here
    Upsample2D = None

# Rows of the 3x3 kernel each phase's 2 taps sum: phase 0 -> (k0, k1+k2); phase 1 -> (k0+k1, k2).
_COLLAPSE = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


def _conv_of(up) -> torch.nn.Module | None:
    return getattr(up, "conv", None) if getattr(up, "name", "conv") == "conv" else getattr(up, "Conv2d_0", None)


def eligible(up) -> bool:
    """A diffusers ``Upsample2D`` that is nearest-x2 interpolation then a plain 3x3/stride 1/padding 1 conv."""
    if Upsample2D is None or not isinstance(up, Upsample2D):
        return False
    conv = _conv_of(up)
    return (bool(up.use_conv) and not up.use_conv_transpose and bool(getattr(up, "interpolate", True))
            and getattr(up, "norm", None) is None and type(conv) is torch.nn.Conv2d
            and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and conv.in_channels == up.channels)


def phase_kernels(weight: torch.Tensor, bias: torch.Tensor | None):
    """(4*Co, Ci, 2, 2) kernels, phase p = 2a+b in output-channel block p, and the bias repeated 4 times; summed
    in fp32 (fp64 for fp64 weights), returned in the weight's dtype and memory format."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    rows = _COLLAPSE.to(device=weight.device, dtype=acc)
    k = torch.einsum("aur,ocrs,bvs->abocuv", rows, weight.to(acc), rows)  # (2, 2, Co, Ci, 2, 2)
    k = k.reshape(-1, *weight.shape[1:2], 2, 2).to(weight.dtype)
    if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        k = k.contiguous(memory_format=torch.channels_last)
    return k, (bias.repeat(4) if bias is not None else None)


def polyphase_conv(x: torch.Tensor, kernels: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv3x3(nearest_x2(x)) from the stacked phase kernels (see ``phase_kernels``)."""
    n, _, h, w = x.shape
    y = F.conv2d(x, kernels, bias, padding=1)  # (N, 4*Co, H+1, W+1)
    co = y.shape[1] // 4
    sn, sc, sh, sw = y.stride()
    # out[n, c, 2i+a, 2j+b] = y[n, (2a+b)*Co + c, i+a, j+b]: one strided view of y (logical n, c, i, a, j, b),
    # then one copy into the memory order of y (measured faster than four phase copies, bf16 most).
    v = torch.as_strided(y, (n, co, h, 2, w, 2), (sn, sc, sh, sh + 2 * co * sc, sw, sw + co * sc),
                         y.storage_offset())
    if y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous():
        return v.permute(0, 2, 3, 4, 5, 1).contiguous().view(n, 2 * h, 2 * w, co).permute(0, 3, 1, 2)
    return v.contiguous().view(n, co, 2 * h, 2 * w)

if Upsample2D is not None:
    class PolyphaseUpsample2D(Upsample2D):
        """``Upsample2D`` whose nearest-x2 + 3x3 conv runs as one 2x2 conv over 4 phases (module docstring)."""

        def _phase_kernels(self):
            conv = _conv_of(self)
            weight, bias = conv.weight, conv.bias
            if torch.compiler.is_compiling():
                return phase_kernels(weight, bias)
            key = (weight.data_ptr(), version_counter(weight), weight.dtype, weight.device, weight.stride(),
                   None if bias is None else (bias.data_ptr(), version_counter(bias), bias.dtype))
            cache = self.__dict__.get("_polyphase_cache")
            if cache is None or cache[0] != key:
                with torch.no_grad():
                    cache = (key, *phase_kernels(weight, bias))
                self.__dict__["_polyphase_cache"] = cache
            return cache[1], cache[2]

        def forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
            h, w = hidden_states.shape[-2:]
            conv = _conv_of(self)
            if (args or kwargs.get("scale") is not None
                    or (output_size is not None and tuple(output_size) != (2 * h, 2 * w))
                    or (torch.is_grad_enabled() and conv.weight.requires_grad)):
                return super().forward(hidden_states, output_size, *args, **kwargs)
            kernels, bias = self._phase_kernels()
            return polyphase_conv(hidden_states, kernels, bias)
else:  # pragma: no cover
    PolyphaseUpsample2D = None


def patch_upsamplers(model: torch.nn.Module) -> int:
    """Make every eligible ``Upsample2D`` in ``model`` a ``PolyphaseUpsample2D`` (in place; inference only: the
    state_dict is unchanged). Returns the number patched (already-patched modules are counted again)."""
    n = 0
    for module in model.modules():
        if eligible(module):
            if type(module) is Upsample2D:
                module.__class__ = PolyphaseUpsample2D
            n += type(module) is PolyphaseUpsample2D
    return n


def unpatch_upsamplers(model: torch.nn.Module) -> int:
    """Undo ``patch_upsamplers``; returns the number restored."""
    n = 0
    for module in model.modules():
        if PolyphaseUpsample2D is not None and type(module) is PolyphaseUpsample2D:
            module.__class__ = Upsample2D
            module.__dict__.pop("_polyphase_cache", None)
            n += 1
    return n
