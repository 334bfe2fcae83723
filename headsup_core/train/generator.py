"""The trained network of ``headsup train``: one OSEDiff-style step with HeadsUp's face-aware UNet input, built
with the functions inference uses (``model.assemble_unet_input``, ``faces.condition.encode_reference_windows``)."""

from __future__ import annotations

import torch
from torch import nn

from ..model import HeadsUpModel, assemble_unet_input, mask_to_latent


class HeadsUpGenerator(nn.Module):
    """The trained network, with a ``forward`` so that DDP sees every call."""

    def __init__(self, model: HeadsUpModel):
        super().__init__()
        self.model = model
        conv = model.unet.conv_in  # peft wraps it during training: read the base layer's width
        self.in_channels = int(getattr(conv, "base_layer", conv).in_channels)

    def forward(self, x_src, canvas, mask_px, has_ref, prompt_embeds, ref_windows=None):
        m = self.model
        lq_latent = m.encode(x_src)
        mask_lat = mask_to_latent(mask_px, tuple(lq_latent.shape[-2:]))
        ref_latent = None
        if bool(has_ref.any()):
            ref_latent = self.reference_latent(canvas, mask_lat, has_ref, ref_windows, lq_latent)
        unet_in = assemble_unet_input(lq_latent, ref_latent, mask_lat, self.in_channels)
        x0 = m.predict_x0(unet_in, lq_latent, prompt_embeds)
        return x0, m.decode(x0)


    def reference_latent(self, canvas, mask_lat, has_ref, ref_windows, lq_latent):
        """As the pipeline: each reference encoded in its own face window (``encode_reference_windows``), then
        weighted by the soft face mask. ``ref_windows`` None (old callers): the whole canvas is encoded."""
        from ..faces.condition import encode_reference_windows

        m, hw = self.model, tuple(lq_latent.shape[-2:])
        if ref_windows is None:
            ref = m.encode(canvas)
        else:
            rows = []
            for i in range(canvas.shape[0]):
                lat = None
                if bool(has_ref[i]) and len(ref_windows[i]):
                    lat = encode_reference_windows(canvas[i:i + 1], ref_windows[i].tolist(), m.encode, hw)
                rows.append(lat if lat is not None else lq_latent.new_zeros(1, lq_latent.shape[1], *hw))
            ref = torch.cat(rows)
        return ref * mask_lat.to(ref.dtype) * has_ref.view(-1, 1, 1, 1).to(ref.dtype)
