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
Peak compute memory is one tile's working set. Between steps every tile's current activation and its parked
residuals wait in a ``spill.SpillStore``: in RAM (CPU RAM when computing on a GPU) up to ``ram_budget`` bytes,
beyond it in temporary files, so with a budget the RAM used is bounded by the tile size, not the image size (the
generators hand their activations over and keep no reference to them).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from . import spill, tiled_vae_ldm
from .devices import return_freed_memory
from .memory import STORE_CH
from .tiling import Tile, exact_grid

QUERY_CHUNK = 4096


def _is_diffusers_vae(vae) -> bool:
    enc, dec = getattr(vae, "encoder", None), getattr(vae, "decoder", None)
    return all(hasattr(m, "mid_block") for m in (enc, dec)) and hasattr(enc, "down_blocks") and hasattr(dec, "up_blocks")


def supports_exact(vae) -> bool:
    """True for the structures the lockstep forwards are written for: a diffusers ``AutoencoderKL`` (below) and
    ComfyUI's own SD VAE modules (tiled_vae_ldm.py)."""
    return _is_diffusers_vae(vae) or tiled_vae_ldm.is_ldm_vae(vae)


# ------------------------------------------------------------------------------------------ lockstep forward
# A tile's activation travels in a one-element list, its "hand", and no frame keeps another reference to it: the
# blocks pop it, compute, and put their result back. At a GroupNorm / the attention the generator yields
# ``(kind, module, hand)``; the driver pops the tensor, parks it, and later puts the normalised tensor (or the
# attention's output) back into the hand before resuming the generator. Residuals go to ``park(t)``, which
# returns a slot of the driver's store (RAM or a spill file, see spill.py); ``slot.take()`` gives them back.
def _resnet(block, hand, park):
    x = hand[0]
    res = park(block.conv_shortcut(x) if block.conv_shortcut is not None else x)
    del x
    yield ("norm", block.norm1, hand)
    hand.append(block.conv1(block.nonlinearity(hand.pop())))
    yield ("norm", block.norm2, hand)
    h = block.conv2(block.dropout(block.nonlinearity(hand.pop())))
    hand.append((res.take().to(h.device, h.dtype) + h) / block.output_scale_factor)


def _attention(attn, hand, park):
    res = park(hand[0])
    yield ("norm", attn.group_norm, hand)
    yield ("attn", attn, hand)  # the hand holds the normalised tensor: the driver takes it and returns the output
    out = hand.pop()
    res = res.take()
    if attn.residual_connection:
        out = out + res.to(out.device, out.dtype)
    del res
    hand.append(out / attn.rescale_output_factor)


def _mid(mid, hand, park):
    yield from _resnet(mid.resnets[0], hand, park)
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            yield from _attention(attn, hand, park)
        yield from _resnet(resnet, hand, park)


def encoder_forward(vae, x, park):
    """``vae.encoder`` + ``quant_conv`` on one tile (image in [-1, 1]) -> posterior moments."""
    if not _is_diffusers_vae(vae):
        return (yield from tiled_vae_ldm.encoder_forward(vae, x, park))
    enc = vae.encoder
    hand = [enc.conv_in(x)]
    del x
    for block in enc.down_blocks:
        for resnet in block.resnets:
            yield from _resnet(resnet, hand, park)
        for down in block.downsamplers or []:
            hand.append(down(hand.pop()))
    yield from _mid(enc.mid_block, hand, park)
    yield ("norm", enc.conv_norm_out, hand)
    h = enc.conv_out(enc.conv_act(hand.pop()))
    return vae.quant_conv(h) if getattr(vae, "quant_conv", None) is not None else h


def decoder_forward(vae, z, park):
    """``post_quant_conv`` + ``vae.decoder`` on one tile (unscaled latent) -> image."""
    if not _is_diffusers_vae(vae):
        return (yield from tiled_vae_ldm.decoder_forward(vae, z, park))
    dec = vae.decoder
    if getattr(vae, "post_quant_conv", None) is not None:
        z = vae.post_quant_conv(z)
    hand = [dec.conv_in(z)]
    del z
    yield from _mid(dec.mid_block, hand, park)
    hand.append(hand.pop().to(next(iter(dec.up_blocks.parameters())).dtype))
    for block in dec.up_blocks:
        for resnet in block.resnets:
            yield from _resnet(resnet, hand, park)
        for up in block.upsamplers or []:
            hand.append(up(hand.pop()))
    yield ("norm", dec.conv_norm_out, hand)
    return dec.conv_out(dec.conv_act(hand.pop()))


# ------------------------------------------------------------------------------------------ tiles
def _core_stats(norm: torch.nn.GroupNorm, act: torch.Tensor, tile: Tile, device):
    """(count, per-group mean, per-group variance) of the tile's core."""
    ys, xs = tile.core_in(act)
    core = act[..., ys, xs].to(device).float()
    grouped = core.reshape(core.shape[0], norm.num_groups, -1)
    return grouped.shape[-1], grouped.mean(-1), grouped.var(-1, unbiased=False)


def _pool(stats: list, device):
    """Whole-image mean and variance per group from the cores' (Chan's parallel formula)."""
    n = torch.tensor([s[0] for s in stats], dtype=torch.float32, device=device).reshape(-1, 1, 1)
    m, v = torch.stack([s[1] for s in stats]), torch.stack([s[2] for s in stats])
    mean = (n * m).sum(0) / n.sum()
    var = (n * (v + (m - mean) ** 2)).sum(0) / n.sum()
    return mean, var


def _apply_norm(norm, x, mean, var):
    """GroupNorm of ``x`` with given statistics, in fp32; in place on one fp32 copy (the same operations as
    ``(x - mean) * rsqrt(var + eps) * weight + bias``, so the same bits, with fewer full-size temporaries)."""
    b, c = x.shape[:2]
    g = x.float().reshape(b, norm.num_groups, -1)
    if g.data_ptr() == x.data_ptr():  # fp32 and contiguous: a view of x, which must stay as it is
        g = g.clone()
    g.sub_(mean[..., None]).mul_(torch.rsqrt(var[..., None] + norm.eps))
    y = g.reshape(x.shape)
    if norm.affine:
        shape = (1, c) + (1,) * (x.ndim - 2)
        # .to(device): a host may keep some weights off the compute device (ComfyUI's partial loading)
        y.mul_(norm.weight.float().to(y.device).reshape(shape)).add_(norm.bias.float().to(y.device).reshape(shape))
    return y.to(x.dtype)


def _heads(attn, t):
    b, n, inner = t.shape
    return t.view(b, n, attn.heads, inner // attn.heads).transpose(1, 2)


def _add_core(full: torch.Tensor | None, act: torch.Tensor, tile: Tile, shape_hw, device) -> torch.Tensor:
    """Copy the tile's core into the whole-image tensor (allocated at the first tile) the keys/values come from."""
    f = act.shape[-2] / (tile.read[1] - tile.read[0])
    if full is None:
        full = torch.zeros(1, act.shape[1], round(shape_hw[0] * f), round(shape_hw[1] * f), device=device,
                           dtype=act.dtype)
    ys, xs = tile.core_in(act)
    y0, x0 = round(tile.core[0] * f), round(tile.core[2] * f)
    core = act[..., ys, xs]
    full[..., y0:y0 + core.shape[-2], x0:x0 + core.shape[-1]] = core.to(device)
    return full


def _keys_values(attn, full: torch.Tensor):
    tokens = full.flatten(2).transpose(1, 2)
    return _heads(attn, attn.to_k(tokens)), _heads(attn, attn.to_v(tokens))


def _attend(attn, act: torch.Tensor, kv) -> torch.Tensor:
    """One tile's attention: its queries over ``kv`` (keys/values from all cores: the untiled VAE's global
    attention), or over its own tokens when ``kv`` is None."""
    b, c, h, w = act.shape
    q_tokens = act.flatten(2).transpose(1, 2)
    if kv is None:
        k, v = _heads(attn, attn.to_k(q_tokens)), _heads(attn, attn.to_v(q_tokens))
        o = F.scaled_dot_product_attention(_heads(attn, attn.to_q(q_tokens)), k, v)
        o = attn.to_out[1](attn.to_out[0](o.transpose(1, 2).reshape(b, -1, c)))
        return o.transpose(1, 2).reshape(b, c, h, w)
    k, v = kv
    chunks = []
    for s in range(0, q_tokens.shape[1], QUERY_CHUNK):
        q = _heads(attn, attn.to_q(q_tokens[:, s:s + QUERY_CHUNK]))
        o = F.scaled_dot_product_attention(q, k, v)
        chunks.append(o.transpose(1, 2).reshape(b, -1, attn.heads * o.shape[-1]))
    o = attn.to_out[1](attn.to_out[0](torch.cat(chunks, 1).to(q_tokens.dtype)))
    return o.transpose(1, 2).reshape(b, c, h, w)


class _Step:
    """What the tiles handed over for one lockstep step: the request, and what pooling needs from each core
    (gathered as each tile arrives, so a parked activation is read back once, when it is normalised)."""

    def __init__(self):
        self.request = None
        self.arrived = self.finished = 0
        self.stats: list = []
        self.full: torch.Tensor | None = None

    def add(self, kind, module, act, tile, shape_hw, device, global_attention):
        if self.request is None:
            self.request = (kind, module)
        elif self.request[0] != kind or self.request[1] is not module:
            raise RuntimeError("tiles of the lockstep VAE forward went out of step")
        self.arrived += 1
        if kind == "norm":
            self.stats.append(_core_stats(module, act, tile, device))
        elif global_attention:
            self.full = _add_core(self.full, act, tile, shape_hw, device)


def _parked_hint(vae, stage, tiles: list[Tile], scale: int) -> int | None:
    """About what the stage parks in all (memory.py's STORE_CH), for the disk-full message."""
    try:
        width = int(vae.config.block_out_channels[0]) if hasattr(vae, "config") else int(stage.ch)  # LDM: .ch
        size = next(stage.parameters()).element_size()
    except (AttributeError, TypeError, IndexError, StopIteration):
        return None
    area = sum((t.read[1] - t.read[0]) * (t.read[3] - t.read[2]) for t in tiles) * scale * scale
    return STORE_CH * width * area * size


@torch.no_grad()
def run_exact(forward: Callable, vae, x: torch.Tensor, *, in_factor: int, out_factor: int,
              compute_device: torch.device, grid: list[Tile] | None = None, tile: int = 0, context: int = 0,
              out_device: torch.device | None = None,
              progress: Callable[[], None] | None = None, global_attention: bool = True,
              ram_budget: int | None = None, ticks: int | None = None) -> torch.Tensor:
    """Run ``forward(vae, tile_input, park)`` (``encoder_forward`` / ``decoder_forward``) over ``x`` (1xCxHxW,
    H and W multiples of ``in_factor``) in the tiles of ``grid`` (a plan's ``TilePlan.grid``; else cores of at
    most ``tile`` latent units read with ``context`` around), with pooled GroupNorm statistics; returns the
    assembled output on ``out_device``.

    Between steps each tile's activation and residuals are parked in a ``SpillStore``: in RAM (CPU RAM when
    computing on a GPU) up to ``ram_budget`` bytes, beyond it in temporary files (``None``: all in RAM). Within
    a step the tiles run one at a time: take the tile's activation, normalise it with the pooled statistics (or
    attend), run the tile to its next GroupNorm, gather its core's statistics and park the new activation. The
    result does not depend on the budget (parked tensors come back bit for bit). Every spill file is removed when
    the stage ends, also on an exception or interrupt."""
    out_device = out_device or x.device
    compute_device = torch.device(compute_device)
    storage = torch.device("cpu") if compute_device.type != "cpu" else compute_device
    h, w = x.shape[-2] // in_factor, x.shape[-1] // in_factor
    tiles = grid if grid is not None else exact_grid(h, w, tile, context)
    n = len(tiles)
    # The tiles finish together, so spread the progress ticks (also interrupt points; ``ticks``, default one per
    # tile) over the lockstep steps: about one step per GroupNorm / attention of the stage; any left at the end.
    ticks_total = n if ticks is None else ticks
    stage = getattr(vae, "encoder" if out_factor == 1 else "decoder", vae)
    expected_steps = max(1, sum(isinstance(m, torch.nn.GroupNorm) or type(m).__name__ in ("Attention", "AttnBlock")
                                for m in stage.modules()))
    hint = _parked_hint(vae, stage, tiles, max(in_factor, out_factor))
    store = spill.SpillStore(ram_budget, storage, expected_bytes=hint)
    gens: list = [None] * n
    hands: list = [None] * n
    slots: list = [None] * n
    result: list = [None]

    def place(i, out):
        if result[0] is None:
            result[0] = torch.zeros(1, out.shape[1], h * out_factor, w * out_factor, device=out_device)
        t = tiles[i]
        ys, xs = t.core_in(out)
        y0, x0 = t.core[0] * out_factor, t.core[2] * out_factor
        core = out[..., ys, xs]
        result[0][..., y0:y0 + core.shape[-2], x0:x0 + core.shape[-1]] = core.float().to(out_device)

    def advance(i, gathered: _Step):
        """Run tile ``i`` to its next yield (or its end); gather and park what it hands over."""
        try:
            kind, module, hand = gens[i].send(None)
        except StopIteration as stop:
            gens[i] = None
            gathered.finished += 1
            place(i, stop.value)
            return
        act = hand.pop()
        hands[i] = hand
        gathered.add(kind, module, act, tiles[i], (h, w), compute_device, global_attention)
        slots[i] = store.put(act)

    try:
        current = _Step()
        for i, t in enumerate(tiles):
            y0, y1, x0, x1 = t.read
            gens[i] = forward(vae, x[..., y0 * in_factor:y1 * in_factor, x0 * in_factor:x1 * in_factor]
                              .to(compute_device), store.put)
            advance(i, current)
        step, given = 0, 0
        while current.finished < n:
            if current.finished or current.arrived != n:
                raise RuntimeError("tiles of the lockstep VAE forward went out of step")
            kind, module = current.request
            following = _Step()
            if kind == "norm":
                mean, var = _pool(current.stats, compute_device)
                for i in range(n):
                    slot, slots[i] = slots[i], None
                    hands[i].append(_apply_norm(module, slot.take().to(compute_device), mean, var))
                    del slot
                    advance(i, following)
                    if ram_budget is not None:
                        return_freed_memory()
            else:
                keys_values, attend = ((tiled_vae_ldm.keys_values, tiled_vae_ldm.attend)
                                       if tiled_vae_ldm.is_ldm_attention(module) else (_keys_values, _attend))
                kv = keys_values(module, current.full) if global_attention else None
                current.full = None
                for i in range(n):
                    slot, slots[i] = slots[i], None
                    hands[i].append(attend(module, slot.take().to(compute_device), kv))
                    del slot
                    advance(i, following)
                    if ram_budget is not None:
                        return_freed_memory()
                del kv
            current = following
            step += 1
            while progress and given < ticks_total - 1 and step * ticks_total >= (given + 1) * expected_steps:
                given += 1
                progress()
    finally:
        for gen in gens:
            if gen is not None:
                gen.close()
        store.close()
    for _ in range(ticks_total - given if progress else 0):
        progress()
    return result[0]
