"""Measured CPU defaults (headsup_core/perf.py): channels_last, bf16 only for the VAE decoder and only on CPUs with
native bf16, the encoder and the UNet in fp32 (the x0 update amplifies their errors); and the bf16 stage's NaN
retry."""
from __future__ import annotations

import logging

import numpy as np
import torch

from headsup_core import HeadsUpPipeline, precision


def test_native_bf16_is_read_from_the_cpu_flags_never_assumed():
    assert precision.cpu_native_bf16({"avx512f", "avx512_bf16"}) and precision.cpu_native_bf16({"amx_bf16", "amx_tile"})
    assert not precision.cpu_native_bf16({"avx512f", "avx2"}) and not precision.cpu_native_bf16(set())


def test_cpu_defaults_by_stage(tiny_models, monkeypatch):
    monkeypatch.delenv(precision.ENV_BF16, raising=False)
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda flags=None: True)
    pipe = HeadsUpPipeline.from_files(tiny_models["base"], tiny_models["headsup"], device="cpu")
    m = pipe.model
    assert pipe.source["formats"] == {"channels_last": True, "polyphase_upsample": 3, "decoder": "bf16"}
    assert (m.decoder_dtype, m.encoder_dtype, m.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    assert m.vae.post_quant_conv.weight.dtype == torch.bfloat16 and m.vae.quant_conv.weight.dtype == torch.float32
    # read from the file in these dtypes: the loader's record agrees
    assert pipe.source["dtypes"]["decoder"] == {"compute": "bfloat16", "storage": "bfloat16"}
    assert pipe.source["dtypes"]["encoder"] == {"compute": "float32", "storage": "float32"}
    assert m.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    img = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    out = pipe.upscale(img, 2, color_fix="none").astype(np.float64)
    ref_pipe = HeadsUpPipeline.from_files(tiny_models["base"], tiny_models["headsup"], device="cpu", dtype="fp32")
    assert ref_pipe.model.decoder_dtype == torch.float32
    assert ref_pipe.source["formats"] == {"channels_last": True, "polyphase_upsample": 3}
    ref = ref_pipe.upscale(img, 2, color_fix="none").astype(np.float64)
    psnr = 10 * np.log10(255.0**2 / max(np.mean((out - ref) ** 2), 1e-12))
    assert 30 < psnr < 200, psnr  # close to fp32, and it did run in bf16
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda flags=None: False)
    plain = HeadsUpPipeline.from_files(tiny_models["base"], tiny_models["headsup"], device="cpu")
    assert plain.model.decoder_dtype == torch.float32
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda flags=None: True)
    monkeypatch.setenv(precision.ENV_BF16, "encoder,decoder")  # the override still reaches the encoder
    both = HeadsUpPipeline.from_files(tiny_models["base"], tiny_models["headsup"], device="cpu")
    assert both.model.encoder_dtype == torch.bfloat16 and both.model.decoder_dtype == torch.bfloat16


def test_polyphase_upsamplers_only_in_the_vae_decoder(tiny_models):
    from diffusers.models.upsampling import Upsample2D

    from headsup_core.upsample import PolyphaseUpsample2D

    m = HeadsUpPipeline.from_files(tiny_models["base"], tiny_models["headsup"], device="cpu").model
    kinds = {name: type(mod) for part in ("unet", "vae") for name, mod in getattr(m, part).named_modules(prefix=part)
             if isinstance(mod, Upsample2D)}
    assert sorted(n for n, k in kinds.items() if k is PolyphaseUpsample2D) == [
        f"vae.decoder.up_blocks.{i}.upsamplers.0" for i in range(3)]
    assert any(n.startswith("unet.") and k is Upsample2D for n, k in kinds.items())


def test_nan_in_the_bf16_decoder_is_retried_in_fp32(tiny_models, monkeypatch, caplog):
    monkeypatch.setenv(precision.ENV_BF16, "decoder")
    pipe = HeadsUpPipeline.from_files(tiny_models["base"], tiny_models["headsup"], device="cpu")
    conv = pipe.model.vae.decoder.conv_out
    real = conv.forward

    def poisoned(x):
        y = real(x)
        return y if y.dtype == torch.float32 else y * float("nan")

    monkeypatch.setattr(conv, "forward", poisoned)
    with caplog.at_level(logging.WARNING, logger="headsup"):
        out = pipe.upscale(np.zeros((16, 16, 3), np.uint8) + 128, 2, color_fix="none")
    assert np.isfinite(out).all() and any("retrying" in r.message and "decoder" in r.message for r in caplog.records)
    assert pipe.model.decoder_dtype == torch.bfloat16  # back to bf16 after the retry
