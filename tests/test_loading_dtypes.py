"""Weights read straight into their stage dtypes, and the UNet's 16-bit storage with fp32 compute."""
from __future__ import annotations

import logging

import pytest
import torch

from headsup_core import precision
from headsup_core.errors import HeadsUpError
from headsup_core.loading.base import base_param_count, load_base
from headsup_core.loading.build import build_model
from headsup_core.loading.stream import SingleFile

F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16


def test_single_file_is_read_straight_into_each_stage_dtype(tiny_models):
    path = tiny_models["base_single"]
    ref = load_base(path)
    got = load_base(path, dtypes={"unet": F16, "encoder": F32, "decoder": BF16})
    assert {p.dtype for p in got.unet.parameters()} == {F16}
    assert {p.dtype for p in got.vae.encoder.parameters()} == {F32}
    assert {p.dtype for p in got.vae.decoder.parameters()} == {BF16}
    assert got.vae.quant_conv.weight.dtype == F32 and got.vae.post_quant_conv.weight.dtype == BF16
    for (name, a), (_, b) in zip(ref.unet.state_dict().items(), got.unet.state_dict().items()):
        assert torch.equal(a.half(), b), name  # the same values, cast once
    assert ref.fingerprint == got.fingerprint


def test_streamed_read_equals_a_whole_file_read_in_small_chunks(tiny_models, monkeypatch):
    from safetensors.torch import load_file

    import headsup_core.loading.stream as stream

    path = str(tiny_models["base_single"])
    whole = load_file(path)
    monkeypatch.setattr(stream, "CHUNK_BYTES", 1)  # reopen the map after every tensor
    src = SingleFile(path)
    assert set(src.header) == set(whole) and all(src.header[k].shape == whole[k].shape for k in whole)
    assert all(t.device.type == "meta" for t in src.header.values())  # the header reads no data
    keys = src.keys_with_prefix("first_stage_model.")
    got = src.read(keys, lambda k, d: F32, strip_prefix="first_stage_model.")
    assert len(got) == len(keys) > 10
    for key in keys:
        t = got[key[len("first_stage_model."):]]
        assert t.dtype == F32 and torch.equal(t, whole[key].float())
    # copies, not views of the mapped file: writing to one leaves a fresh read unchanged
    first = next(iter(got.values()))
    first.add_(1)
    again = src.read(keys[:1], lambda k, d: F32, strip_prefix="first_stage_model.")
    assert not torch.equal(next(iter(again.values())), first)


def test_storage_policy():
    compute = {"unet": F32, "encoder": F32, "decoder": BF16}
    cpu = torch.device("cpu")
    # plenty of memory: weights stay in their compute dtype
    assert precision.storage_dtypes(cpu, compute, "auto", 4 * 10**9, budget=20 * 10**9) == compute
    # short of memory: only the UNet is kept narrower (the VAE always computes in what it stores)
    short = precision.storage_dtypes(cpu, compute, "auto", 4 * 10**9, budget=6 * 10**9)
    assert short == {"unet": F16, "encoder": F32, "decoder": BF16}
    assert precision.storage_dtypes(cpu, compute, "bf16")["unet"] == BF16
    assert precision.storage_dtypes(cpu, compute, "fp32") == compute
    # never wider than compute, and a GPU's fp16 compute keeps fp16
    half = {s: F16 for s in precision.STAGES}
    assert precision.storage_dtypes(torch.device("cuda"), half, "auto", 4 * 10**9, budget=10**9) == half
    assert precision.storage_dtypes(cpu, half, "fp32") == half
    with pytest.raises(HeadsUpError, match="weight_dtype must be one of"):
        precision.storage_dtypes(cpu, compute, "int8")


@torch.no_grad()
def test_fp16_storage_computes_exactly_what_fp32_on_fp16_rounded_weights_computes(tiny_models):
    stored, info = build_model(tiny_models["base_single"], tiny_models["headsup"], "cpu", "fp32", weight_dtype="fp16")
    full, _ = build_model(tiny_models["base_single"], tiny_models["headsup"], "cpu", "fp32", weight_dtype="fp32")
    assert info["dtypes"]["unet"] == {"compute": "float32", "storage": "float16"}
    assert stored.unet.conv_in.weight.dtype == F16 and stored.dtype == F32
    norms = [m for m in stored.unet.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    assert norms and all(p.dtype == F32 for m in norms for p in m.parameters())
    stored_layers = dict(stored.unet.named_modules())
    merged_max = 0.0
    for name, module in full.unet.named_modules():  # the reference gets the stored fp16 layer weights, in fp32
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            for pname, p in module.named_parameters(recurse=False):
                s16 = getattr(stored_layers[name], pname)
                assert s16.dtype == F16
                merged_max = max(merged_max, float((p - s16.float()).abs().max() / p.abs().max().clamp_min(1e-8)))
                p.copy_(s16.float())
    assert merged_max < 2e-3  # the LoRA merged into fp16 storage: within fp16 rounding of the fp32 merge
    x = torch.randn(1, 9, 16, 16, generator=torch.Generator().manual_seed(0))
    lq = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    a = stored.predict_x0(x, lq, stored.default_prompt_embeds)
    b = full.predict_x0(x, lq, full.default_prompt_embeds)
    assert torch.equal(a, b)
    assert stored.unet.conv_in.weight.dtype == F16  # back to storage after the forward


def test_pipeline_with_fp16_storage_upscales_close_to_fp32(tiny_models):
    from headsup_core import HeadsUpPipeline

    img = torch.rand(1, 24, 20, 3, generator=torch.Generator().manual_seed(2))
    a = HeadsUpPipeline.from_files(tiny_models["base_single"], tiny_models["headsup"], "cpu", weight_dtype="fp16")
    b = HeadsUpPipeline.from_files(tiny_models["base_single"], tiny_models["headsup"], "cpu", weight_dtype="fp32")
    assert a.source["dtypes"]["unet"]["storage"] == "float16"
    out_a, out_b = a.upscale(img, scale=2), b.upscale(img, scale=2)
    mse = float(((out_a - out_b) ** 2).mean())
    assert out_a.shape == out_b.shape and 0 < mse < 1e-4


def test_to_a_new_dtype_after_fp16_storage_leaves_one_consistent_model(tiny_models):
    """A1111 loads on the CPU (auto storage may keep the UNet's weights in fp16 behind cast hooks) and then calls
    ``pipe.to(cuda, fp16)``: the hooks must follow, or each layer is cast back to fp32 while activations are fp16
    ("mat1 and mat2 must have the same dtype"). Checked on the CPU in fp16, and back to fp32."""
    import numpy as np

    from headsup_core import HeadsUpPipeline

    pipe = HeadsUpPipeline.from_files(tiny_models["base_single"], tiny_models["headsup"], device="cpu",
                                      weight_dtype="fp16")
    img = (np.random.RandomState(0).rand(16, 16, 3) * 255).astype(np.uint8)
    narrow = pipe.upscale(img, 2, color_fix="none")
    for dtype in (torch.float16, torch.float32):
        out = pipe.to("cpu", dtype).upscale(img, 2, color_fix="none")
        params = {p.dtype for p in pipe.model.parameters()}
        assert params == {dtype} and pipe.dtype == dtype, (dtype, params)  # no layer left in another dtype
        assert np.abs(out.astype(int) - narrow.astype(int)).mean() < 3, dtype  # the same picture


def test_auto_storage_narrows_the_unet_when_the_budget_is_short(tiny_models, monkeypatch, caplog):
    import headsup_core.memory as memory

    n = base_param_count(tiny_models["base_single"])
    assert n > 0
    monkeypatch.setattr(memory, "budget_bytes", lambda *a, **k: 4 * n)  # fp32 weights = the whole budget
    with caplog.at_level(logging.INFO, logger="headsup"):
        model, info = build_model(tiny_models["base_single"], tiny_models["headsup"], "cpu", None)
    assert info["dtypes"]["unet"]["storage"] == "float16" and model.dtype == F32
    assert "keeping fp32 stages' weights in fp16" in caplog.text


@pytest.mark.parametrize("zipped", [True, False], ids=["zip-ckpt", "legacy-ckpt"])
def test_ckpt_base_loads_like_its_safetensors_twin(tiny_models, tmp_path, zipped):
    """A ``.ckpt`` in the layout SD2.1's own release uses ({"state_dict": ...}): memory-mapped when it is a zip
    checkpoint, read whole when it is a legacy one; same weights, same stage dtypes."""
    from safetensors.torch import load_file

    path = tmp_path / "v2-1_512-ema-pruned.ckpt"
    sd = load_file(str(tiny_models["base_single"]))
    sd["model_ema.decay"] = torch.tensor(0.9999)  # non-model entries the loader must skip
    torch.save({"state_dict": sd, "global_step": 1}, path, _use_new_zipfile_serialization=zipped)
    ref = load_base(tiny_models["base_single"], configs=_tiny_configs(tiny_models))
    got = load_base(path, configs=_tiny_configs(tiny_models), dtypes={"unet": F16, "encoder": F32, "decoder": BF16})
    assert {p.dtype for p in got.unet.parameters()} == {F16}
    assert {p.dtype for p in got.vae.decoder.parameters()} == {BF16}
    for (name, a), (_, b) in zip(ref.unet.state_dict().items(), got.unet.state_dict().items()):
        assert torch.equal(a.half(), b), name
    assert got.fingerprint == ref.fingerprint


def _tiny_configs(tiny_models):
    import json

    from safetensors import safe_open

    from headsup_core.loading.base import TINY_CONFIG_KEY

    with safe_open(str(tiny_models["base_single"]), "pt") as f:
        return json.loads(f.metadata()[TINY_CONFIG_KEY])
