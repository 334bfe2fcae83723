"""Weights formats: HeadsUp .safetensors, OSEDiff .pkl, SD2.x bases (folder and single file), and bad files."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from headsup_core import HeadsUpPipeline
from headsup_core.loading.base import identify_architecture, load_base
from headsup_core.loading.weight_files import read_state_dict
from headsup_core.loading.weights import REQUIRED_METADATA, convert_osediff, load_weights
from headsup_core.errors import MissingModelError, WeightsError


def _image(h=32, w=48, seed=0):
    return (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)


def test_single_file_and_folder_bases_load_identically(tiny_models):
    folder, single = load_base(tiny_models["base"]), load_base(tiny_models["base_single"])
    for a, b in ((folder.unet, single.unet), (folder.vae, single.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
    assert folder.arch == single.arch == "sd2"
    assert folder.prediction_type == single.prediction_type == "epsilon"


def test_headsup_checkpoint_metadata_and_round_trip(tiny_models, tmp_path):
    w = load_weights(tiny_models["headsup"])
    meta = w.metadata
    for key in REQUIRED_METADATA:
        assert key in meta, key
    assert meta["format"] == "headsup" and meta["in_channels"] == "9" and meta["timestep"] == "999"
    assert json.loads(meta["unet_lora_targets"]) and json.loads(meta["vae_lora_targets"])
    assert w.prompt_embeds is not None and tuple(w.prompt_embeds.shape) == (1, 77, 32)
    assert any(".lora_A." in k for k in w.unet_state) and "conv_in.weight" in w.unet_state
    assert any("quant_conv" in k for k in w.vae_state), "OSEDiff puts LoRA on the VAE's quant_conv too"


def test_convert_osediff_matches_loading_the_pkl(tiny_models, tmp_path):
    out = convert_osediff(tiny_models["osediff"], tmp_path / "converted.safetensors")
    img = _image()
    direct = HeadsUpPipeline.from_files(tiny_models["base"], tiny_models["osediff"], device="cpu")
    converted = HeadsUpPipeline.from_files(tiny_models["base"], out, device="cpu")
    a = direct.upscale(img, 2, color_fix="none", prompt_embeds=torch.zeros(1, 77, 32)).astype(int)
    b = converted.upscale(img, 2, color_fix="none", prompt_embeds=torch.zeros(1, 77, 32)).astype(int)
    assert np.abs(a - b).max() <= 1
    # OSEDiff has 4 input channels: the converted conv_in gains 5 zero channels, so conditioning is inert.
    conv = load_weights(out).unet_state["conv_in.weight"]
    assert conv.shape[1] == 9 and torch.count_nonzero(conv[:, 4:]) == 0


def test_checkpoint_naming_the_removed_lora_module_still_loads(tiny_models, tmp_path):
    """Checkpoints written before the re-export modules were removed record
    ``headsup_core.lora.add_osediff_adapters`` in their metadata: they load, the name is read as today's, and a
    pipeline built from them gives the same picture as the same tensors without that record."""
    import importlib

    tensors, meta = read_state_dict(tiny_models["headsup"])
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={**meta, "lora_targets_from": "headsup_core.lora.add_osediff_adapters"})
    w = load_weights(old)
    module, _, name = w.metadata["lora_targets_from"].rpartition(".")
    assert module == "headsup_core.loading.surgery" and callable(getattr(importlib.import_module(module), name))
    img = _image()
    a = HeadsUpPipeline.from_files(tiny_models["base"], old, device="cpu").upscale(img, 2, color_fix="none")
    b = HeadsUpPipeline.from_files(tiny_models["base"], tiny_models["headsup"], device="cpu").upscale(
        img, 2, color_fix="none")
    assert np.array_equal(a, b)


def test_weights_change_the_output(tiny_models):
    img = _image()
    bare = HeadsUpPipeline.from_files(tiny_models["base"], None, device="cpu").upscale(img, 2, color_fix="none")
    tuned = HeadsUpPipeline.from_files(tiny_models["base"], tiny_models["headsup"], device="cpu").upscale(
        img, 2, color_fix="none")
    assert np.abs(bare.astype(int) - tuned.astype(int)).mean() > 0.5


def test_truncated_safetensors_is_refused(tiny_models, tmp_path):
    data = tiny_models["headsup"].read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        load_weights(bad)


def test_empty_file_is_refused(tmp_path):
    for name in ("empty.safetensors", "empty.pkl", "empty.ckpt"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(WeightsError, match="empty"):
            read_state_dict(tmp_path / name)


def test_missing_paths_name_the_file(tmp_path):
    with pytest.raises(MissingModelError, match="nowhere.safetensors"):
        load_weights(tmp_path / "nowhere.safetensors")
    with pytest.raises(MissingModelError, match="no_base"):
        load_base(tmp_path / "no_base")
    (tmp_path / "not_diffusers").mkdir()
    with pytest.raises(MissingModelError, match="unet"):
        load_base(tmp_path / "not_diffusers")


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickle_carrying_code_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pkl"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict_unet": _Evil(marker)}, f)
    with pytest.raises(WeightsError, match="contains code"):
        load_weights(bad)
    assert not marker.exists()


def _ldm(arch: str) -> dict:
    p = "model.diffusion_model."
    if arch == "sd1":
        return {p + "input_blocks.1.1.proj_in.weight": torch.zeros(320, 320, 1, 1), "first_stage_model.x": torch.zeros(1)}
    if arch == "sdxl":
        return {p + "input_blocks.0.0.weight": torch.zeros(1), "conditioner.embedders.1.model.x": torch.zeros(1)}
    return {"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}


@pytest.mark.parametrize("arch,name", [("sd1", "Stable Diffusion 1.x"), ("sdxl", "SDXL"), ("flux", "Flux")])
def test_wrong_architecture_is_refused_with_what_was_found(tmp_path, arch, name):
    path = tmp_path / f"{arch}.safetensors"
    save_file(_ldm(arch), str(path))
    assert identify_architecture(_ldm(arch)) == arch
    with pytest.raises(WeightsError, match=f"is {name}.*needs a Stable Diffusion 2.x base"):
        load_base(path)


def test_base_given_as_weights_is_explained(tiny_models):
    with pytest.raises(WeightsError, match="base Stable Diffusion checkpoint"):
        load_weights(tiny_models["base_single"])


def test_foreign_pkl_is_refused(tmp_path):
    path = tmp_path / "other.pkl"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(WeightsError, match="not an OSEDiff checkpoint"):
        load_weights(path)
