"""RAM's tagging head (Query2Label style) and the whole tagging network, with RAM's tensor names.

Per tag class a query ``relu(wordvec_proj(label_embed))`` attends to the projected image tokens
(``image_proj(swin(image))``) through a small BERT whose layers keep only the cross-attention and the
feed-forward (RAM deletes their self-attention and the embeddings), then ``fc`` gives one logit per class.
Module names follow RAM's ``tagging_head.encoder.layer.<i>.{crossattention,intermediate,output}``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .swin import SwinConfig, SwinEncoder

BERT_LAYER_NORM_EPS = 1e-12  # RAM's q2l_config.json


@dataclass(frozen=True)
class HeadConfig:
    num_classes: int = 4585
    label_dim: int = 512       # label_embed width, also image_proj's output (the cross-attention's key width)
    hidden: int = 768
    num_heads: int = 4         # not visible in the tensors' shapes: RAM's q2l_config.json
    num_layers: int = 2
    intermediate: int = 3072

    @classmethod
    def from_state_dict(cls, sd: dict, num_heads: int = 4) -> "HeadConfig":
        label = sd["label_embed"]
        layers = {int(m.group(1)) for k in sd if (m := re.match(r"tagging_head\.encoder\.layer\.(\d+)\.", k))}
        inter = sd["tagging_head.encoder.layer.0.intermediate.dense.weight"]
        return cls(num_classes=int(label.shape[0]), label_dim=int(label.shape[1]),
                   hidden=int(sd["wordvec_proj.weight"].shape[0]), num_heads=num_heads,
                   num_layers=max(layers) + 1, intermediate=int(inter.shape[0]))


class _Dense(nn.Module):
    """Linear + residual LayerNorm (BERT's SelfOutput / Output)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)
        self.LayerNorm = nn.LayerNorm(n_out, eps=BERT_LAYER_NORM_EPS)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class _CrossSelf(nn.Module):
    def __init__(self, hidden: int, kv_dim: int):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_dim, hidden)
        self.value = nn.Linear(kv_dim, hidden)


class _CrossAttention(nn.Module):
    def __init__(self, hidden: int, kv_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.self = _CrossSelf(hidden, kv_dim)
        self.output = _Dense(hidden, hidden)

    def forward(self, h: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        b, n, c = h.shape

        def split(t):
            return t.view(b, t.shape[1], self.heads, c // self.heads).transpose(1, 2)

        q, k, v = split(self.self.query(h)), split(self.self.key(kv)), split(self.self.value(kv))
        ctx = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.output(ctx, h)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.dense = nn.Linear(hidden, inter)

    def forward(self, x):
        return F.gelu(self.dense(x))  # BERT's "gelu" (erf form)


class Q2LLayer(nn.Module):
    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.crossattention = _CrossAttention(cfg.hidden, cfg.label_dim, cfg.num_heads)
        self.intermediate = _Intermediate(cfg.hidden, cfg.intermediate)
        self.output = _Dense(cfg.intermediate, cfg.hidden)

    def forward(self, h, kv):
        a = self.crossattention(h, kv)
        return self.output(self.intermediate(a), a)


class _Encoder(nn.Module):
    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.layer = nn.ModuleList(Q2LLayer(cfg) for _ in range(cfg.num_layers))


class _TaggingHead(nn.Module):
    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.encoder = _Encoder(cfg)

    def forward(self, h, kv):
        for layer in self.encoder.layer:
            h = layer(h, kv)
        return h


class RamTaggingNet(nn.Module):
    """Normalised 3xSxS image batch -> per-class logits (B, num_classes)."""

    def __init__(self, swin: SwinConfig, head: HeadConfig):
        super().__init__()
        self.visual_encoder = SwinEncoder(swin)
        self.image_proj = nn.Linear(swin.num_features, head.label_dim)
        self.label_embed = nn.Parameter(torch.zeros(head.num_classes, head.label_dim))
        self.wordvec_proj = nn.Linear(head.label_dim, head.hidden)
        self.tagging_head = _TaggingHead(head)
        self.fc = nn.Linear(head.hidden, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        kv = self.image_proj(self.visual_encoder(image))
        queries = F.relu(self.wordvec_proj(self.label_embed))
        h = self.tagging_head(queries.unsqueeze(0).expand(image.shape[0], -1, -1), kv)
        return self.fc(h).squeeze(-1)
