"""Exact tiled VAE: every GroupNorm uses statistics pooled over all tiles of the whole image.

The scheme of the tiled-VAE hook OSEDiff uses in its default (non-fast) mode, written for diffusers'
``Encoder``/``Decoder``: all tiles run through the network in lockstep. At each GroupNorm every tile reports the
per-group count, mean and variance of its *core* (the part of the image it owns; cores partition the image), the
counts/means/variances are pooled exactly (Chan's parallel formula), and every tile is normalised with the
whole-image statistics. Each tile reads ``context`` extra latent units around its core so convolutions see real
neighbours; only the core of each output is kept. Two choices go beyond the hook:

* statistics come from the cores only (the hook averages per-tile variances over padded tiles, which double
  counts the padding and ignores the spread of the tile means);
* the mid-block self-attention, which is global in the untiled VAE, attends to keys/values assembled from all
  tiles' cores (queries chunked), instead of to the tile alone.

What remains inexact is the convolutions' receptive field beyond ``context``. The forward pass is expressed as a
generator per tile that yields at each GroupNorm and at the attention, so the driver can pool across tiles.
Peak compute memory is one tile's working set; all tiles' current activations are held on ``storage`` (CPU
when computing on a GPU).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

QUERY_CHUNK = 4096


def supports_exact(vae) -> bool:
    """True for a diffusers ``AutoencoderKL`` (the structure the lockstep forward is written for)."""
    enc, dec = getattr(vae, "encoder", None), getattr(vae, "decoder", None)
    return all(hasattr(m, "mid_block") for m in (enc, dec)) and hasattr(enc, "down_blocks") and hasattr(dec, "up_blocks")


# ------------------------------------------------------------------------------------------ lockstep forward
def _resnet(block, x, park):
    res = block.conv_shortcut(x) if block.conv_shortcut is not None else x
    res = park(res)
    h = yield ("norm", block.norm1, x)
    del x
    h = block.conv1(block.nonlinearity(h))
    h = yield ("norm", block.norm2, h)
    h = block.conv2(block.dropout(block.nonlinearity(h)))
    return (res.to(h.device, h.dtype) + h) / block.output_scale_factor


def _attention(attn, x, park):
    res = park(x)
    h = yield ("norm", attn.group_norm, x)
    del x
    out = yield ("attn", attn, h)
    if attn.residual_connection:
        out = out + res.to(out.device, out.dtype)
    return out / attn.rescale_output_factor


def _mid(mid, h, park):
    h = yield from _resnet(mid.resnets[0], h, park)
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            h = yield from _attention(attn, h, park)
        h = yield from _resnet(resnet, h, park)
    return h


def encoder_forward(vae, x, park):
    """``vae.encoder`` + ``quant_conv`` on one tile (image in [-1, 1]) -> posterior moments."""
    enc = vae.encoder
    h = enc.conv_in(x)
    del x
    for block in enc.down_blocks:
        for resnet in block.resnets:
            h = yield from _resnet(resnet, h, park)
        for down in block.downsamplers or []:
            h = down(h)
    h = yield from _mid(enc.mid_block, h, park)
    h = yield ("norm", enc.conv_norm_out, h)
    h = enc.conv_out(enc.conv_act(h))
    return vae.quant_conv(h) if getattr(vae, "quant_conv", None) is not None else h


def decoder_forward(vae, z, park):
    """``post_quant_conv`` + ``vae.decoder`` on one tile (unscaled latent) -> image."""
    dec = vae.decoder
    if getattr(vae, "post_quant_conv", None) is not None:
        z = vae.post_quant_conv(z)
    h = dec.conv_in(z)
    del z
    h = yield from _mid(dec.mid_block, h, park)
    h = h.to(next(iter(dec.up_blocks.parameters())).dtype)
    for block in dec.up_blocks:
        for resnet in block.resnets:
            h = yield from _resnet(resnet, h, park)
        for up in block.upsamplers or []:
            h = up(h)
    h = yield ("norm", dec.conv_norm_out, h)
    return dec.conv_out(dec.conv_act(h))


# ------------------------------------------------------------------------------------------ tiles
def partition(length: int, tile: int) -> list[tuple[int, int]]:
    """Split ``length`` latent units into nearly equal cores of at most ``tile``."""
    n = max(1, math.ceil(length / max(1, tile)))
    bounds = [round(i * length / n) for i in range(n + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(n)]


class _Tile:
    def __init__(self, cy, cx, h, w, context):
        self.core = (cy[0], cy[1], cx[0], cx[1])
        self.read = (max(0, cy[0] - context), min(h, cy[1] + context), max(0, cx[0] - context), min(w, cx[1] + context))

    def core_in(self, act: torch.Tensor) -> tuple[slice, slice]:
        """The core's slice of this tile's activation (any resolution: its scale is read off the shape)."""
        f = act.shape[-2] / (self.read[1] - self.read[0])
        y0, y1, x0, x1 = (round((c - r) * f) for c, r in zip(self.core, (self.read[0],) * 2 + (self.read[2],) * 2))
        return slice(y0, y1), slice(x0, x1)


def _pooled_group_norm(norm: torch.nn.GroupNorm, acts: list[torch.Tensor], tiles: list[_Tile], device):
    g = norm.num_groups
    counts, means, vars_ = [], [], []
    for act, tile in zip(acts, tiles):
        ys, xs = tile.core_in(act)
        core = act[..., ys, xs].to(device).float()
        grouped = core.reshape(core.shape[0], g, -1)
        counts.append(grouped.shape[-1])
        means.append(grouped.mean(-1))
        vars_.append(grouped.var(-1, unbiased=False))
    n = torch.tensor(counts, dtype=torch.float32, device=device).reshape(-1, 1, 1)
    m, v = torch.stack(means), torch.stack(vars_)
    mean = (n * m).sum(0) / n.sum()
    var = (n * (v + (m - mean) ** 2)).sum(0) / n.sum()
    return mean, var


def _apply_norm(norm, x, mean, var):
    b, c = x.shape[:2]
    g = x.float().reshape(b, norm.num_groups, -1)
    y = ((g - mean[..., None]) * torch.rsqrt(var[..., None] + norm.eps)).reshape(x.shape)
    if norm.affine:
        shape = (1, c) + (1,) * (x.ndim - 2)
        y = y * norm.weight.float().reshape(shape) + norm.bias.float().reshape(shape)
    return y.to(x.dtype)


def _heads(attn, t):
    b, n, inner = t.shape
    return t.view(b, n, attn.heads, inner // attn.heads).transpose(1, 2)


def _global_attention(attn, acts: list[torch.Tensor], tiles: list[_Tile], shape_hw, device) -> list[torch.Tensor]:
    """Attention of each tile's queries over keys/values from all cores (the untiled VAE's global attention)."""
    c = acts[0].shape[1]
    f = acts[0].shape[-2] / (tiles[0].read[1] - tiles[0].read[0])
    full = torch.zeros(1, c, round(shape_hw[0] * f), round(shape_hw[1] * f), device=device, dtype=acts[0].dtype)
    for act, tile in zip(acts, tiles):
        ys, xs = tile.core_in(act)
        y0, x0 = round(tile.core[0] * f), round(tile.core[2] * f)
        core = act[..., ys, xs]
        full[..., y0:y0 + core.shape[-2], x0:x0 + core.shape[-1]] = core.to(device)
    tokens = full.flatten(2).transpose(1, 2)
    del full
    k, v = _heads(attn, attn.to_k(tokens)), _heads(attn, attn.to_v(tokens))
    del tokens
    outs = []
    for act in acts:
        b, _, h, w = act.shape
        q_tokens = act.to(device).flatten(2).transpose(1, 2)
        chunks = []
        for s in range(0, q_tokens.shape[1], QUERY_CHUNK):
            q = _heads(attn, attn.to_q(q_tokens[:, s:s + QUERY_CHUNK]))
            o = F.scaled_dot_product_attention(q, k, v)
            chunks.append(o.transpose(1, 2).reshape(b, -1, attn.heads * o.shape[-1]))
        o = attn.to_out[1](attn.to_out[0](torch.cat(chunks, 1).to(q_tokens.dtype)))
        outs.append(o.transpose(1, 2).reshape(b, c, h, w))
    return outs


@torch.no_grad()
def run_exact(forward: Callable, vae, x: torch.Tensor, *, tile: int, context: int, in_factor: int, out_factor: int,
              compute_device: torch.device, out_device: torch.device | None = None,
              progress: Callable[[], None] | None = None, global_attention: bool = True) -> torch.Tensor:
    """Run ``forward(vae, tile_input, park)`` (``encoder_forward`` / ``decoder_forward``) over ``x`` (1xCxHxW,
    H and W multiples of ``in_factor``) in tiles of at most ``tile`` latent units, with pooled GroupNorm
    statistics; returns the assembled output on ``out_device``."""
    out_device = out_device or x.device
    storage = torch.device("cpu") if torch.device(compute_device).type != "cpu" else torch.device(compute_device)
    h, w = x.shape[-2] // in_factor, x.shape[-1] // in_factor
    tiles = [_Tile(cy, cx, h, w, context) for cy in partition(h, tile) for cx in partition(w, tile)]

    def park(t):
        return t.to(storage) if t.device != storage else t

    gens, acts = [], []
    for t in tiles:
        y0, y1, x0, x1 = t.read
        gens.append(forward(vae, x[..., y0 * in_factor:y1 * in_factor, x0 * in_factor:x1 * in_factor]
                            .to(compute_device), park))
    sends: list = [None] * len(tiles)
    outputs: list = [None] * len(tiles)
    # The tiles finish together, so spread the per-tile progress ticks (also interrupt points) over the lockstep
    # steps: about one step per GroupNorm / attention of the stage; any ticks left are given at the end.
    stage = getattr(vae, "encoder" if out_factor == 1 else "decoder", vae)
    expected_steps = max(1, sum(isinstance(m, torch.nn.GroupNorm) or type(m).__name__ == "Attention"
                                for m in stage.modules()))
    step, ticks = 0, 0
    while True:
        requests = []
        for i, gen in enumerate(gens):
            try:
                req = gen.send(sends[i])
            except StopIteration as stop:
                outputs[i] = stop.value
                req = None
            if req is not None:
                requests.append((i, req))
                sends[i] = None
        if not requests:
            break
        if len(requests) != len(tiles):
            raise RuntimeError("tiles of the lockstep VAE forward went out of step")
        kind, module = requests[0][1][0], requests[0][1][1]
        acts = [park(req[2]) for _, req in requests]
        if kind == "norm":
            mean, var = _pooled_group_norm(module, acts, tiles, compute_device)
            for (i, _), act in zip(requests, acts):
                sends[i] = _apply_norm(module, act.to(compute_device), mean, var)
        elif global_attention:
            for (i, _), out in zip(requests, _global_attention(module, acts, tiles, (h, w), compute_device)):
                sends[i] = out
        else:
            for (i, _), act in zip(requests, acts):
                a = act.to(compute_device)
                b, c, hh, ww = a.shape
                tok = a.flatten(2).transpose(1, 2)
                o = F.scaled_dot_product_attention(_heads(module, module.to_q(tok)), _heads(module, module.to_k(tok)),
                                                   _heads(module, module.to_v(tok)))
                o = module.to_out[1](module.to_out[0](o.transpose(1, 2).reshape(b, -1, c)))
                sends[i] = o.transpose(1, 2).reshape(b, c, hh, ww)
        del acts
        step += 1
        while progress and ticks < len(tiles) - 1 and step * len(tiles) >= (ticks + 1) * expected_steps:
            ticks += 1
            progress()
    result = None
    for t, out in zip(tiles, outputs):
        if result is None:
            result = torch.zeros(1, out.shape[1], h * out_factor, w * out_factor, device=out_device)
        ys, xs = t.core_in(out)
        y0, x0 = t.core[0] * out_factor, t.core[2] * out_factor
        core = out[..., ys, xs]
        result[..., y0:y0 + core.shape[-2], x0:x0 + core.shape[-1]] = core.float().to(out_device)
    for _ in range(len(tiles) - ticks if progress else 0):
        progress()
    return result
