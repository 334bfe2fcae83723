"""A compact Swin Transformer with RAM's module names, for the DAPE/RAM tagger's visual encoder.

The parameter names match the ``visual_encoder.*`` tensors of RAM's checkpoints (``patch_embed``,
``layers.<i>.blocks.<j>.{norm1,attn,norm2,mlp}``, ``layers.<i>.downsample``, ``norm``), so the weights load by
name with no remapping. The maths follows the Swin paper as RAM runs it: windowed attention with a learned
relative-position bias, every second block shifted by half a window (masked with -100 across the shift seam),
no shift in a stage whose resolution is at most one window, patch merging between stages, a final LayerNorm. The
output is the average-pooled token followed by the spatial tokens (RAM's "cls" convention).

The configuration is read from the tensors' shapes (``SwinConfig.from_state_dict``), so RAM's Swin-L at 384
(embed 192, depths 2/2/18/2, heads 6/12/24/48, window 12) and smaller test models with the same structure load
through the same code.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SHIFT_MASK_VALUE = -100.0  # what RAM's Swin adds between tokens from different regions of a shifted window


@dataclass(frozen=True)
class SwinConfig:
    img_size: int = 384
    patch_size: int = 4
    embed_dim: int = 192
    depths: tuple = (2, 2, 18, 2)
    num_heads: tuple = (6, 12, 24, 48)
    window_size: int = 12
    mlp_ratio: float = 4.0

    @property
    def num_features(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @classmethod
    def from_state_dict(cls, sd: dict, prefix: str = "", img_size: int = 384) -> "SwinConfig":
        """The architecture of the Swin whose tensors ``sd`` holds (names relative to ``prefix``)."""
        proj = sd[prefix + "patch_embed.proj.weight"]
        depth: dict[int, int] = {}
        heads: dict[int, int] = {}
        window = None
        pat = re.compile(re.escape(prefix) + r"layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table$")
        for key, t in sd.items():
            m = pat.match(key)
            if m:
                i, j = int(m.group(1)), int(m.group(2))
                depth[i] = max(depth.get(i, 0), j + 1)
                heads[i] = int(t.shape[1])
                side = round(t.shape[0] ** 0.5)
                window = (side + 1) // 2 if window is None else window
        n = max(depth) + 1 if depth else 0
        if n == 0 or sorted(depth) != list(range(n)):
            raise ValueError("no complete set of Swin stages (layers.<i>.blocks.<j>) in the state dict")
        mlp = sd[prefix + "layers.0.blocks.0.mlp.fc1.weight"].shape[0] / proj.shape[0]
        return cls(img_size=img_size, patch_size=int(proj.shape[-1]), embed_dim=int(proj.shape[0]),
                   depths=tuple(depth[i] for i in range(n)), num_heads=tuple(heads[i] for i in range(n)),
                   window_size=int(window), mlp_ratio=float(mlp))


def _windows(x: torch.Tensor, w: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/w * W/w, w*w, C)."""
    b, h, wd, c = x.shape
    x = x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, c)


def _unwindows(x: torch.Tensor, w: int, h: int, wd: int) -> torch.Tensor:
    b = x.shape[0] // ((h // w) * (wd // w))
    x = x.view(b, h // w, wd // w, w, w, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, wd, -1)


def _relative_position_index(w: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)  # 2, w*w
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)
    return rel[..., 0] * (2 * w - 1) + rel[..., 1]  # w*w, w*w


def _shift_mask(h: int, wd: int, w: int, shift: int) -> torch.Tensor:
    """(nW, w*w, w*w) additive mask: 0 within a region of the shifted window, -100 across regions."""
    img = torch.zeros(1, h, wd, 1)
    cnt = 0
    for hs in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
        for ws in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    win = _windows(img, w).squeeze(-1)  # nW, w*w
    diff = win[:, None, :] - win[:, :, None]
    return torch.where(diff != 0, torch.tensor(SHIFT_MASK_VALUE), torch.tensor(0.0))


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        self.heads, self.window = heads, window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.make_buffers()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def make_buffers(self, device=None):
        self.register_buffer("relative_position_index", _relative_position_index(self.window).to(device),
                             persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bw, n, c = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, -1).permute(2, 0, 1)  # heads, n, n
        if mask is not None:  # (nW, n, n): windows of one image in order, repeated per image
            nw = mask.shape[0]
            bias = (bias[None] + mask[:, None]).repeat(bw // nw, 1, 1, 1)  # bw, heads, n, n
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, resolution: int, heads: int, window: int, shift: int, mlp_ratio: float):
        super().__init__()
        if resolution <= window:  # the whole map is one window: no partition, no shift
            window, shift = resolution, 0
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.make_buffers()

    def make_buffers(self, device=None):
        r, w, s = self.resolution, self.window, self.shift
        mask = _shift_mask(r, r, w, s).to(device) if s else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        r, w, s = self.resolution, self.window, self.shift
        y = self.norm1(x).view(b, r, r, c)
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = _unwindows(self.attn(_windows(y, w), self.attn_mask), w, r, r)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + y.reshape(b, n, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        b, _, c = x.shape
        r = self.resolution
        x = x.view(b, r, r, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class Stage(nn.Module):
    def __init__(self, blocks: list, downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


def make_buffers(module: nn.Module, device=None) -> None:
    """(Re)compute the fixed index and mask buffers, e.g. after building on the meta device."""
    for m in module.modules():
        if isinstance(m, (WindowAttention, SwinBlock)):
            m.make_buffers(device)


class SwinEncoder(nn.Module):
    """Image (B, 3, S, S), normalised -> (B, 1 + tokens, num_features): mean token, then the spatial tokens."""

    def __init__(self, cfg: SwinConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim)
        res = cfg.img_size // cfg.patch_size
        stages = []
        for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
            dim, r = cfg.embed_dim * 2 ** i, res // 2 ** i
            blocks = [SwinBlock(dim, r, heads, cfg.window_size, 0 if j % 2 == 0 else cfg.window_size // 2,
                                cfg.mlp_ratio) for j in range(depth)]
            last = i == len(cfg.depths) - 1
            stages.append(Stage(blocks, None if last else PatchMerging(dim, r)))
        self.layers = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(cfg.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        x = self.norm(x)
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
