"""Diffusers folders load like single files: each stage read straight into its dtype, in every folder layout, with
the fingerprint read from the files and the text encoder run before the UNet is read."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from headsup_core.errors import HeadsUpError
from headsup_core.loading import build as build_mod
from headsup_core.loading.base import base_fingerprint, load_base, open_base
from headsup_core.loading.folder import component_files

F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16
DTYPES = {"unet": F16, "encoder": F32, "decoder": BF16}


def _diffusers_reference(folder):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
    return unet.state_dict(), vae.state_dict()


def _assert_loaded_like(ref, base):
    unet_ref, vae_ref = ref
    assert {p.dtype for p in base.unet.parameters()} == {F16}
    assert {p.dtype for p in base.vae.encoder.parameters()} == {F32}
    assert {p.dtype for p in base.vae.decoder.parameters()} == {BF16}
    assert base.vae.post_quant_conv.weight.dtype == BF16 and base.vae.quant_conv.weight.dtype == F32
    got_unet, got_vae = base.unet.state_dict(), base.vae.state_dict()
    assert set(got_unet) == set(unet_ref) and set(got_vae) == set(vae_ref)
    for key, value in unet_ref.items():
        assert torch.equal(value.to(F16), got_unet[key]), key  # the stored values, cast once
    for key, value in vae_ref.items():
        assert torch.equal(value.to(got_vae[key].dtype), got_vae[key]), key


def _copy_folder(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("text_encoder", "tokenizer"))
    return dst


def test_folder_is_read_straight_into_each_stage_dtype(tiny_models):
    folder = tiny_models["base"]
    base = load_base(folder, dtypes=DTYPES)
    _assert_loaded_like(_diffusers_reference(folder), base)
    assert base.fingerprint == base_fingerprint(load_base(folder).unet)


def test_folder_is_not_read_by_from_pretrained(tiny_models, monkeypatch):
    """The streamed reader is the one used (from_pretrained would read fp32, then cast: both copies at once)."""
    from diffusers import ModelMixin

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained was called")

    monkeypatch.setattr(ModelMixin, "from_pretrained", classmethod(refuse))
    base = load_base(tiny_models["base"], dtypes=DTYPES)
    assert base.unet.conv_in.weight.dtype == F16


def test_sharded_and_fp16_variant_folders_load_the_same_weights(tiny_models, tmp_path):
    folder = tiny_models["base"]
    ref = _diffusers_reference(folder)
    sharded = _copy_folder(folder, tmp_path / "sharded")
    for sub in ("unet", "vae"):
        whole = load_file(sharded / sub / "diffusion_pytorch_model.safetensors")
        keys = sorted(whole)
        halves = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
        for name, part in halves.items():
            save_file({k: whole[k] for k in part}, sharded / sub / name)
        index = {"metadata": {}, "weight_map": {k: n for n, part in halves.items() for k in part}}
        (sharded / sub / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
        (sharded / sub / "diffusion_pytorch_model.safetensors").unlink()
    assert len(component_files(sharded, "unet")) == 2
    _assert_loaded_like(ref, load_base(sharded, dtypes=DTYPES))

    variant = _copy_folder(folder, tmp_path / "variant")
    for sub in ("unet", "vae"):
        whole = load_file(variant / sub / "diffusion_pytorch_model.safetensors")
        save_file({k: v.half() for k, v in whole.items()}, variant / sub / "diffusion_pytorch_model.fp16.safetensors")
        (variant / sub / "diffusion_pytorch_model.safetensors").unlink()
    base = load_base(variant, dtypes=DTYPES)
    assert base.unet.conv_in.weight.dtype == F16
    assert torch.equal(base.unet.conv_in.weight, ref[0]["conv_in.weight"].half())


def test_folder_without_weights_or_with_missing_shards_is_refused_in_one_sentence(tiny_models, tmp_path):
    empty = _copy_folder(tiny_models["base"], tmp_path / "empty")
    (empty / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(HeadsUpError, match="no weights"):
        open_base(empty)
    (empty / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"conv_in.weight": "gone.safetensors"}}))
    with pytest.raises(HeadsUpError, match="missing"):
        open_base(empty)


def test_old_tensor_names_fall_back_to_diffusers_conversion(tiny_models, tmp_path):
    """A folder whose VAE uses diffusers' pre-0.14 attention names still loads (from_pretrained converts them)."""
    old = _copy_folder(tiny_models["base"], tmp_path / "old")
    path = old / "vae" / "diffusion_pytorch_model.safetensors"
    whole = load_file(path)
    renamed = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
               .replace(".to_out.0.", ".proj_attn."): v for k, v in whole.items()}
    if renamed.keys() == whole.keys():
        pytest.skip("the tiny VAE has no attention block")
    save_file(renamed, path)
    base = load_base(old, dtypes=DTYPES)
    ref = _diffusers_reference(tiny_models["base"])[1]
    got = base.vae.state_dict()
    assert all(torch.equal(ref[k].to(got[k].dtype), got[k]) for k in ref)


@pytest.mark.parametrize("key", ["base", "base_single"])
def test_text_encoder_runs_before_the_unet_is_read(tiny_models, monkeypatch, key):
    """The default prompt is encoded, and the text encoder freed, before the UNet is read: never both at once."""
    from headsup_core.loading import text_encoder

    text_encoder._EMBED_CACHE.clear()
    events = []
    real_open, real_load = build_mod.open_base, build_mod.load_models

    def open_base_spy(*args, **kwargs):
        base = real_open(*args, **kwargs)
        loader = base.text_encoder_loader
        assert loader is not None

        def loader_spy():
            events.append(("text", base.unet is None))
            return loader()
        base.text_encoder_loader = loader_spy
        return base

    def load_models_spy(base, dtypes=None):
        events.append(("models", base.unet is None))
        return real_load(base, dtypes)

    monkeypatch.setattr(build_mod, "open_base", open_base_spy)
    monkeypatch.setattr(build_mod, "load_models", load_models_spy)
    model, info = build_mod.build_model(tiny_models[key], None, "cpu", "fp32")
    assert events == [("text", True), ("models", True)]
    assert model.default_prompt_embeds.abs().sum() > 0
    assert info["base_fingerprint"] == base_fingerprint(load_base(tiny_models[key]).unet)


def test_truncated_weights_or_broken_config_in_a_folder_are_refused_in_one_sentence(tiny_models, tmp_path):
    broken = _copy_folder(tiny_models["base"], tmp_path / "broken")
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(HeadsUpError, match="corrupt or truncated"):
        load_base(broken)
    (broken / "vae" / "config.json").write_text("{not json")
    with pytest.raises(HeadsUpError, match="Cannot read .*config.json"):
        open_base(broken)
