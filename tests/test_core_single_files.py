"""SD2.x single files as people have them: layouts, their text encoder, the tokenizer, refusals and warnings."""
from __future__ import annotations

import importlib.util
import logging
import pickle
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from headsup_core import HeadsUpPipeline
from headsup_core.loading.base import identify_architecture, identify_layout, load_base
from headsup_core.loading.weights import base_warnings, convert_osediff_with_base, load_weights
from headsup_core.errors import WeightsError
from headsup_core.loading.text_encoder import (TEXT_PREFIXES, convert_text_encoder, find_bpe_vocab, osediff_prompt,
                                               sd2_tokenizer, text_layout, tokenize)


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def _write_variant(src, dst, edit):
    tensors, meta = _read(src)
    save_file({k: v.contiguous() for k, v in edit(dict(tensors)).items()}, str(dst), metadata=meta)
    return dst


def test_layouts_are_identified_from_tensor_names(tiny_models):
    ldm, _ = _read(tiny_models["base_single"])
    sgm, _ = _read(tiny_models["base_sgm"])
    assert identify_architecture(ldm) == identify_architecture(sgm) == "sd2"
    assert identify_layout(ldm) == "ldm" and identify_layout(sgm) == "sgm"
    assert load_base(tiny_models["base_sgm"]).layout == "sgm"


def test_single_file_text_encoder_equals_the_folder_one(tiny_models):
    tok_f, enc_f = load_base(tiny_models["base"]).text_encoder_loader()
    for key in ("base_single", "base_sgm"):
        tok_s, enc_s = load_base(tiny_models[key]).text_encoder_loader()
        ids = tokenize(tok_s, ", a man,")
        assert torch.equal(ids, tokenize(tok_f, ", a man,"))
        with torch.no_grad():
            assert torch.equal(enc_s(ids)[0], enc_f(ids)[0])


@pytest.mark.parametrize("name,edit,message", [
    ("sdxl", lambda sd: {**sd, "conditioner.embedders.1.model.token_embedding.weight": torch.zeros(8, 8),
                         "conditioner.embedders.0.transformer.text_model.x": torch.zeros(1)}, "is SDXL.*2 text embedder"),
    ("sd1", lambda sd: {**{k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")},
                        **{k: v[..., None, None] for k, v in sd.items() if k.endswith("proj_in.weight")},
                        "cond_stage_model.transformer.text_model.x": torch.zeros(1)}, "is Stable Diffusion 1.x"),
    ("truncated", lambda sd: {k: v for k, v in sd.items() if ".resblocks." not in k or ".resblocks.0." in k},
     "has 1 transformer blocks but SD2 needs 2"),
    ("narrow", lambda sd: {**sd, "cond_stage_model.model.token_embedding.weight": torch.zeros(49408, 16)},
     "16 wide but SD2's OpenCLIP-H text encoder is 32 wide"),
    ("no_vae", lambda sd: {k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}, "no VAE"),
])
def test_bad_single_files_are_refused_in_one_sentence(tiny_models, tmp_path, name, edit, message):
    path = _write_variant(tiny_models["base_single"], tmp_path / f"{name}.safetensors", edit)
    with pytest.raises(WeightsError, match=message) as err:
        load_base(path)
    assert str(err.value).count(". ") <= 1 and "\n" not in str(err.value)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_ckpt_carrying_code_is_refused_and_not_run(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "v2-1_512-ema-pruned.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"model.diffusion_model.x": _Evil(marker)}}, f)
    with pytest.raises(WeightsError, match="contains code"):
        load_base(path)
    assert not marker.exists()


def test_tokenizer_is_clip_bpe_padded_with_exclamation_mark():
    tok = sd2_tokenizer()
    assert tok.pad_token == "!" and tok.pad_token_id == 0 and tok.model_max_length == 77
    ids = tokenize(tok, osediff_prompt())[0].tolist()
    assert osediff_prompt() == ", ," and ids[:4] == [49406, 267, 267, 49407] and set(ids[4:]) == {0}
    assert osediff_prompt("a man") == ", a man," and osediff_prompt("a man", "face") == "face, a man,"
    # CLIP's own reference tokenizer (shipped next to the vocabulary) gives the same ids.
    spec = importlib.util.spec_from_file_location("clip_simple_tokenizer",
                                                  str(find_bpe_vocab().parent / "simple_tokenizer.py"))
    if spec is None or importlib.util.find_spec("ftfy") is None:
        pytest.skip("CLIP's reference tokenizer is not available")
    ref_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref_mod)
    ref = ref_mod.SimpleTokenizer(str(find_bpe_vocab()))
    for text in (", a man,", "Portrait of an old woman, 85mm, DSLR", "Crème brûlée — naïve café"):
        expected = [49406] + ref.encode(text) + [49407]
        got = tokenize(tok, text)[0].tolist()
        assert got[:len(expected)] == expected and set(got[len(expected):]) == {0}, text


def _openclip_h_tower(prefix: str, blocks: int = 24, width: int = 1024) -> dict:
    """A full-size OpenCLIP ViT-H/14 text tower with the real key names and shapes (random fp16 weights)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).half()

    sd = {prefix + "token_embedding.weight": r(49408, width), prefix + "positional_embedding": r(77, width),
          prefix + "ln_final.weight": torch.ones(width).half(), prefix + "ln_final.bias": r(width),
          prefix + "text_projection": r(width, width), prefix + "logit_scale": torch.tensor(4.6).half()}
    for i in range(blocks):
        p = f"{prefix}transformer.resblocks.{i}."
        sd.update({p + "ln_1.weight": torch.ones(width).half(), p + "ln_1.bias": r(width),
                   p + "attn.in_proj_weight": r(3 * width, width), p + "attn.in_proj_bias": r(3 * width),
                   p + "attn.out_proj.weight": r(width, width), p + "attn.out_proj.bias": r(width),
                   p + "ln_2.weight": torch.ones(width).half(), p + "ln_2.bias": r(width),
                   p + "mlp.c_fc.weight": r(4 * width, width), p + "mlp.c_fc.bias": r(4 * width),
                   p + "mlp.c_proj.weight": r(width, 4 * width), p + "mlp.c_proj.bias": r(width)})
    return sd


@pytest.mark.slow
def test_full_size_openclip_h_text_tower_converts_to_23_layers():
    """The real on-disk key layout at full width (1024, 24 blocks): identified, converted with the shipped
    config, 23 blocks used (SD2's penultimate layer), q/k/v split from in_proj, final layer norm kept."""
    sd = _openclip_h_tower(TEXT_PREFIXES["ldm"])
    assert text_layout(sd.keys()) == "ldm"
    model = convert_text_encoder(sd, "ldm", "v2-1_512-ema-pruned.safetensors")
    assert model.config.num_hidden_layers == 23 and model.config.hidden_size == 1024
    own = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    assert not any(k.startswith("encoder.layers.23.") for k in own)
    p = TEXT_PREFIXES["ldm"] + "transformer.resblocks.22.attn.in_proj_weight"
    assert torch.equal(own["encoder.layers.22.self_attn.k_proj.weight"], sd[p][1024:2048].float())
    assert torch.equal(own["final_layer_norm.bias"], sd[TEXT_PREFIXES["ldm"] + "ln_final.bias"].float())
    with torch.no_grad():
        out = model(tokenize(sd2_tokenizer(), ", ,"))[0]
    assert out.shape == (1, 77, 1024) and torch.isfinite(out).all()
    del model
    # The same tensors under SD-Turbo's sgm prefix.
    sgm = {k.replace(TEXT_PREFIXES["ldm"], TEXT_PREFIXES["sgm"]): v for k, v in sd.items()}
    del sd
    assert text_layout(sgm.keys()) == "sgm"
    model = convert_text_encoder(sgm, "sgm", "sd_turbo.safetensors")
    with torch.no_grad():
        assert torch.allclose(model(tokenize(sd2_tokenizer(), ", ,"))[0], out, atol=1e-5)


def test_no_text_encoder_and_no_stored_embedding_warns_loudly(tiny_models, tmp_path, caplog):
    path = _write_variant(tiny_models["base_single"], tmp_path / "notext.safetensors",
                          lambda sd: {k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")})
    with caplog.at_level(logging.WARNING, logger="headsup"):
        pipe = HeadsUpPipeline.from_files(path, tiny_models["osediff"], device="cpu")
    assert "all-zero embedding" in caplog.text and "convert-osediff" in caplog.text
    with pytest.raises(Exception, match="text encoder"):
        pipe.upscale(np.zeros((16, 16, 3), np.uint8), 2, prompt="a man")


def test_osediff_on_sgm_base_warns(tiny_models, caplog):
    with caplog.at_level(logging.WARNING, logger="headsup"):
        HeadsUpPipeline.from_files(tiny_models["base_sgm"], tiny_models["osediff"], device="cpu")
    assert "SD-Turbo" in caplog.text and "SD2.1-base" in caplog.text


def test_base_fingerprint_recorded_and_mismatch_warns(tiny_models, tmp_path):
    out = convert_osediff_with_base(tiny_models["osediff"], tmp_path / "osediff_hu.safetensors",
                                    tiny_models["base_single"])
    w = load_weights(out)
    base = load_base(tiny_models["base_single"])
    assert w.metadata["base_fingerprint"] == base.fingerprint
    # The stored embedding is the text encoder on ", ," (OSEDiff's default), so no text encoder is needed later.
    tok, enc = base.text_encoder_loader()
    with torch.no_grad():
        assert torch.allclose(w.prompt_embeds, enc(tokenize(tok, ", ,"))[0], atol=1e-6)
    assert base_warnings(base, w) == []
    other = types.SimpleNamespace(fingerprint="0123456789abcdef", source="other.safetensors", layout="ldm",
                                  prediction_type="epsilon")
    assert any("different base" in m for m in base_warnings(other, w))
    assert load_weights(tiny_models["headsup"]).metadata.get("base_fingerprint") == base.fingerprint


def test_tag_source_hook_feeds_osediff_prompt_form(tiny_models):
    pipe = HeadsUpPipeline.from_files(tiny_models["base_single"], tiny_models["osediff"], device="cpu")
    seen = []

    def tags(image):
        seen.append(tuple(image.shape))
        return "portrait, smiling"

    img = (np.random.RandomState(0).rand(16, 16, 3) * 255).astype(np.uint8)
    a = pipe.upscale(img, 2, color_fix="none", prompt="a man", tag_source=tags)
    b = pipe.upscale(img, 2, color_fix="none", prompt_embeds=pipe.encode_prompt("portrait, smiling, a man,"))
    assert seen == [(1, 3, 16, 16)] and np.array_equal(a, b)


def test_cli_upscale_on_single_file_is_quiet(tiny_models, tmp_path):
    from PIL import Image

    src = tmp_path / "in.png"
    Image.fromarray((np.random.RandomState(0).rand(24, 24, 3) * 255).astype(np.uint8)).save(src)
    cmd = [sys.executable, "-m", "headsup_core.cli", "upscale", str(src), "-o", str(tmp_path / "out.png"),
           "--scale", "2", "--base", str(tiny_models["base_single"]), "--weights", str(tiny_models["osediff"]),
           "--prompt", "a man", "-q"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out.png").exists()
    for noise in ("gemm_4bit", "Traceback", "Loading weights", "Warning", "WARNING", "it/s]"):
        assert noise not in run.stderr, run.stderr
    assert run.stdout.strip() == "" and run.stderr.strip() == "", (run.stdout, run.stderr)  # -q: nothing at all
    imp = subprocess.run([sys.executable, "-c", "import headsup_core, diffusers, peft, peft.tuners.lora"],
                         capture_output=True, text=True, timeout=300)
    assert imp.returncode == 0 and imp.stderr.strip() == "", imp.stderr


def test_folder_base_pads_prompts_to_its_own_tokenizer_length(tiny_models, tmp_path):
    """A diffusers folder whose tokenizer and text encoder were made for 16 tokens is encoded at 16, not SD2's 77
    (transformers refuses a sequence longer than the encoder's positions); single files keep 77."""
    import json
    import shutil

    from transformers import CLIPTextConfig, CLIPTextModel

    from headsup_core.loading.text_encoder import prompt_length
    from headsup_core.testing.tiny_models import TINY_TEXT

    folder = tmp_path / "base16"
    shutil.copytree(tiny_models["base"], folder)
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(**{**TINY_TEXT, "max_position_embeddings": 16})).save_pretrained(
        folder / "text_encoder")
    cfg_path = folder / "tokenizer" / "tokenizer_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "model_max_length": 16}))
    tok, enc = load_base(folder).text_encoder_loader()
    assert prompt_length(tok, enc) == 16
    embeds = HeadsUpPipeline.from_files(str(folder), tiny_models["osediff"], device="cpu").encode_prompt(
        "a portrait of a man with a long beard, " * 4)  # longer than 16 tokens: truncated, not an error
    assert embeds.shape[1] == 16
    assert prompt_length(*load_base(tiny_models["base_single"]).text_encoder_loader()) == 77
