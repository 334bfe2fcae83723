"""The exact tiled VAE's lockstep forwards for ComfyUI's own VAE modules (the LDM layout).

ComfyUI builds SD's VAE from ``comfy.ldm.modules.diffusionmodules.model``: ``Encoder`` (``conv_in``,
``down[i].block[j]`` / ``down[i].downsample``, ``mid.block_1`` / ``mid.attn_1`` / ``mid.block_2``, ``norm_out``,
``conv_out``) and ``Decoder`` (the same with ``up[i]`` run in reverse order and ``upsample``), with ``ResnetBlock``
(``norm1``, ``conv1``, ``norm2``, ``conv2``, ``nin_shortcut`` / ``conv_shortcut``; swish) and ``AttnBlock`` (one
head over the channels: ``norm``, 1x1 convs ``q``/``k``/``v``/``proj_out``, a residual). Its wrapper
(``first_stage_model``) holds ``quant_conv`` / ``post_quant_conv`` where the checkpoint has them.

These generators follow tiled_vae.py's protocol (a tile's activation travels in a one-element list; they yield
``("norm", groupnorm, hand)`` and ``("attn", attnblock, hand)``), so ``tiled_vae.run_exact`` drives them
unchanged; only the attention's maths (``keys_values`` / ``attend``) is this layout's own. Convolutions, the
up/downsamplers and the GroupNorm weights are ComfyUI's own modules, called as they are (their weight casting
and patches apply). Only the structure above is recognised (``is_ldm_vae``): the 2-D SD/SDXL VAEs; a video
VAE, a decoder with ``tanh_out`` / ``give_pre_end`` or attention inside the levels is not.

Engine layer: imports nothing from the package.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

QUERY_CHUNK = 4096
_LDM_MODULE = "diffusionmodules.model"  # where ComfyUI (and the LDM code it derives from) defines these blocks


def _is_block(module, name: str) -> bool:
    kind = type(module)
    return kind.__name__ == name and kind.__module__.endswith(_LDM_MODULE)


def _is_resnet(block) -> bool:
    return (_is_block(block, "ResnetBlock") and isinstance(block.norm1, torch.nn.GroupNorm)
            and isinstance(block.norm2, torch.nn.GroupNorm) and isinstance(block.conv1, torch.nn.Conv2d))


def is_ldm_attention(attn) -> bool:
    return (_is_block(attn, "AttnBlock") and isinstance(attn.norm, torch.nn.GroupNorm)
            and all(isinstance(getattr(attn, p, None), torch.nn.Conv2d) for p in ("q", "k", "v", "proj_out")))


def _levels_ok(levels, last_has_no_resample: bool, resample: str) -> bool:
    for i, level in enumerate(levels):
        if len(level.attn) or not all(_is_resnet(b) for b in level.block):
            return False
        if (i == len(levels) - 1 if last_has_no_resample else i == 0) == hasattr(level, resample):
            return False
    return True


def _mid_ok(mid) -> bool:
    return _is_resnet(mid.block_1) and is_ldm_attention(mid.attn_1) and _is_resnet(mid.block_2)


def is_ldm_vae(vae) -> bool:
    """True when ``vae`` (ComfyUI's ``first_stage_model``) has the 2-D LDM Encoder/Decoder these forwards run."""
    enc, dec = getattr(vae, "encoder", None), getattr(vae, "decoder", None)
    try:
        return (_is_block(enc, "Encoder") and _is_block(dec, "Decoder")
                and isinstance(enc.conv_in, torch.nn.Conv2d) and isinstance(dec.conv_in, torch.nn.Conv2d)
                and isinstance(enc.norm_out, torch.nn.GroupNorm) and isinstance(dec.norm_out, torch.nn.GroupNorm)
                and not getattr(dec, "tanh_out", False) and not getattr(dec, "give_pre_end", False)
                and _levels_ok(enc.down, True, "downsample") and _levels_ok(dec.up, False, "upsample")
                and all(float(getattr(level.upsample, "scale_factor", 0)) == 2.0 for level in dec.up[1:])
                and _mid_ok(enc.mid) and _mid_ok(dec.mid))
    except (AttributeError, TypeError):
        return False


def _resnet(block, hand, park):
    """ComfyUI's ``ResnetBlock.forward`` without a time embedding: x + conv2(swish(norm2(conv1(swish(norm1 x)))))."""
    x = hand[0]
    if block.in_channels != block.out_channels:
        x = block.conv_shortcut(x) if block.use_conv_shortcut else block.nin_shortcut(x)
    res = park(x)
    del x
    yield ("norm", block.norm1, hand)
    hand.append(block.conv1(F.silu(hand.pop())))
    yield ("norm", block.norm2, hand)
    h = block.conv2(block.dropout(F.silu(hand.pop())))
    hand.append(res.take().to(h.device, h.dtype) + h)


def _attention(attn, hand, park):
    res = park(hand[0])
    yield ("norm", attn.norm, hand)
    yield ("attn", attn, hand)  # the driver replaces the normalised tensor with proj_out(attention)
    out = hand.pop()
    hand.append(res.take().to(out.device, out.dtype) + out)


def _mid(mid, hand, park):
    yield from _resnet(mid.block_1, hand, park)
    yield from _attention(mid.attn_1, hand, park)
    yield from _resnet(mid.block_2, hand, park)


def encoder_forward(vae, x, park):
    """``vae.encoder`` + ``quant_conv`` on one tile (image in [-1, 1]) -> posterior moments."""
    enc = vae.encoder
    hand = [enc.conv_in(x)]
    del x
    for i, level in enumerate(enc.down):
        for block in level.block:
            yield from _resnet(block, hand, park)
        if i != len(enc.down) - 1:
            hand.append(level.downsample(hand.pop()))
    yield from _mid(enc.mid, hand, park)
    yield ("norm", enc.norm_out, hand)
    h = enc.conv_out(F.silu(hand.pop()))
    return vae.quant_conv(h) if getattr(vae, "quant_conv", None) is not None else h


def decoder_forward(vae, z, park):
    """``post_quant_conv`` + ``vae.decoder`` on one tile (unscaled latent) -> image."""
    dec = vae.decoder
    if getattr(vae, "post_quant_conv", None) is not None:
        z = vae.post_quant_conv(z)
    hand = [dec.conv_in(z)]
    del z
    yield from _mid(dec.mid, hand, park)
    for i in reversed(range(len(dec.up))):
        for block in dec.up[i].block:
            yield from _resnet(block, hand, park)
        if i != 0:
            hand.append(dec.up[i].upsample(hand.pop()))
    yield ("norm", dec.norm_out, hand)
    return dec.conv_out(F.silu(hand.pop()))


# ------------------------------------------------------------------------------------------ attention
# AttnBlock's maths: one head whose width is the channel count, softmax(q k^T / sqrt(C)) v, then proj_out.
def _tokens(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(2).transpose(1, 2).unsqueeze(1)  # B x 1 x HW x C


def keys_values(attn, full: torch.Tensor):
    """Keys and values of the whole image (``full``: every tile's normalised core, assembled)."""
    return _tokens(attn.k(full)), _tokens(attn.v(full))


def attend(attn, act: torch.Tensor, kv) -> torch.Tensor:
    """One tile's attention output (before the residual): its queries over ``kv`` (keys/values of all cores,
    the untiled VAE's global attention), or over its own tokens when ``kv`` is None."""
    b, c, h, w = act.shape
    k, v = kv if kv is not None else (_tokens(attn.k(act)), _tokens(attn.v(act)))
    q = _tokens(attn.q(act))
    chunks = [F.scaled_dot_product_attention(q[:, :, s:s + QUERY_CHUNK], k, v)
              for s in range(0, q.shape[2], QUERY_CHUNK)]
    o = torch.cat(chunks, 2).squeeze(1).transpose(1, 2).reshape(b, c, h, w)
    return attn.proj_out(o.to(act.dtype))
