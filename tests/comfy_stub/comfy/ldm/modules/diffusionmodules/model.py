"""Stand-in for ComfyUI's SD VAE blocks (tests only): the attribute layout of
``comfy.ldm.modules.diffusionmodules.model`` (``Encoder.down[i].block[j]``, ``mid.block_1/attn_1/block_2``,
``Decoder.up[i]`` run in reverse order, ``ResnetBlock.nin_shortcut``, ``AttnBlock.q/k/v/proj_out`` as 1x1
convolutions) and the maths of SD's VAE, written from the architecture in plain torch.nn, so CI can run the exact
tiled VAE on this layout without ComfyUI. ``groups`` (32 in ComfyUI) is a parameter so the tiny test VAE fits."""
import torch
import torch.nn.functional as F
from torch import nn


def Normalize(channels, groups=32):
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels, groups=32):
        super().__init__()
        self.in_channels, self.out_channels, self.use_conv_shortcut = in_channels, out_channels, False
        self.norm1 = Normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels, groups)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if self.in_channels != self.out_channels else x) + h


class AttnBlock(nn.Module):
    def __init__(self, channels, groups=32):
        super().__init__()
        self.norm = Normalize(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (t.reshape(b, c, h * w).transpose(1, 2) for t in (self.q(n), self.k(n), self.v(n)))
        weights = torch.softmax(q @ k.transpose(1, 2) / c ** 0.5, dim=-1)
        return x + self.proj_out((weights @ v).transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # SD's VAE pads right and bottom only


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.scale_factor = 2.0
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=self.scale_factor, mode="nearest"))


def _mid(channels, groups):
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, groups)
    mid.attn_1 = AttnBlock(channels, groups)
    mid.block_2 = ResnetBlock(channels, channels, groups)
    return mid


def _run_mid(mid, h):
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, *, ch, ch_mult, num_res_blocks, in_channels=3, z_channels=4, double_z=True, groups=32):
        super().__init__()
        self.ch = ch
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = ch
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(c_in, ch * mult, groups))
                c_in = ch * mult
            level.attn = nn.ModuleList()
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(c_in)
            self.down.append(level)
        self.mid = _mid(c_in, groups)
        self.norm_out = Normalize(c_in, groups)
        self.conv_out = nn.Conv2d(c_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(_run_mid(self.mid, h))))


class Decoder(nn.Module):
    def __init__(self, *, ch, ch_mult, num_res_blocks, out_ch=3, z_channels=4, groups=32):
        super().__init__()
        self.ch, self.give_pre_end, self.tanh_out = ch, False, False
        c_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, padding=1)
        self.mid = _mid(c_in, groups)
        levels = []
        for i in reversed(range(len(ch_mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(c_in, ch * ch_mult[i], groups))
                c_in = ch * ch_mult[i]
            level.attn = nn.ModuleList()
            if i != 0:
                level.upsample = Upsample(c_in)
            levels.insert(0, level)  # up[0] is the finest level, run last
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(c_in, groups)
        self.conv_out = nn.Conv2d(c_in, out_ch, 3, padding=1)

    def forward(self, z):
        h = _run_mid(self.mid, self.conv_in(z))
        for i in reversed(range(len(self.up))):
            for block in self.up[i].block:
                h = block(h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
