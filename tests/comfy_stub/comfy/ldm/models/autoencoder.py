"""Stand-in for ComfyUI's ``AutoencoderKL`` (tests only): ``encoder``/``decoder`` from the stand-in blocks,
``quant_conv``/``post_quant_conv``; ``encode`` returns the posterior's mode, as ComfyUI's does."""
import torch
from torch import nn

from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder


class AutoencoderKL(nn.Module):
    def __init__(self, *, ch, ch_mult, num_res_blocks, z_channels=4, embed_dim=4, groups=32):
        super().__init__()
        shape = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels, groups=groups)
        self.encoder, self.decoder = Encoder(**shape), Decoder(**shape)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    def encode(self, x):
        return torch.chunk(self.quant_conv(self.encoder(x)), 2, dim=1)[0]

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))
