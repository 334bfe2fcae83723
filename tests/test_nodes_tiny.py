"""Every node executed on the tiny models (real loading code, real files) through the ComfyUI stand-in."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "comfy_stub"))
import harness  # noqa: E402

sys.path.remove(str(Path(__file__).parent / "comfy_stub"))

from headsup_core.errors import FaceError  # noqa: E402

pytestmark = pytest.mark.slow


def _photo(name):
    import insightface

    return Image.open(Path(insightface.__file__).parent / "data" / "images" / name).convert("RGB")


def _as_image(pil, size=None):
    if size is not None:
        pil = pil.resize(size, Image.BICUBIC)
    return torch.from_numpy(np.asarray(pil).copy()).float().div(255.0)[None]


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models  # built once per session in conftest.py


@pytest.fixture(scope="module")
def pack(tiny, tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    for sub in ("headsup", "checkpoints", "diffusers"):
        (models / sub).mkdir()
    os.symlink(tiny["headsup"], models / "headsup" / "headsup.safetensors")
    os.symlink(tiny["osediff"], models / "headsup" / "osediff.pkl")
    os.symlink(tiny["base_single"], models / "checkpoints" / "base.safetensors")
    os.symlink(tiny["base"], models / "diffusers" / "base", target_is_directory=True)
    os.symlink(tiny["insightface_root"], models / "insightface", target_is_directory=True)
    os.symlink(tiny["facexlib_dir"], models / "facedetection", target_is_directory=True)
    p = harness.load_pack(models)
    yield p
    harness.unload()


@pytest.fixture(scope="module")
def model(pack):
    return pack.nodes["HeadsUpLoader"].execute(weights="headsup.safetensors", base="diffusers/base",
                                               dtype="auto")[0]


@pytest.fixture(scope="module")
def faces(pack):
    return pack.nodes["HeadsUpFaceAnalysisLoader"].execute(backend="insightface", pack="tiny", provider="auto")[0]


def test_loader_lists_and_caches_the_tiny_models(pack, model):
    ins = {i.id: i for i in pack.nodes["HeadsUpLoader"].GET_SCHEMA().inputs}
    assert ins["weights"].options == ["headsup.safetensors", "osediff.pkl"]
    assert ins["base"].options == ["base.safetensors", "diffusers/base"]
    assert next(model.pipe.model.parameters()).dtype == torch.float32  # auto on CPU
    again = pack.nodes["HeadsUpLoader"].execute(weights="headsup.safetensors", base="diffusers/base", dtype="auto")[0]
    assert again is model
    packs = {i.id: i for i in pack.nodes["HeadsUpFaceAnalysisLoader"].GET_SCHEMA().inputs}["pack"].options
    assert packs[0] == "tiny"


def test_osediff_weights_on_a_single_file_base(pack):
    handle = pack.nodes["HeadsUpLoader"].execute(weights="osediff.pkl", base="base.safetensors", dtype="fp32")[0]
    image, mask = pack.nodes["HeadsUpUpscale"].execute(model=handle, image=torch.rand(1, 16, 24, 3), scale=4.0,
                                                        tile_size=0, color_fix="none").result
    assert image.shape == (1, 64, 96, 3) and mask.shape == (1, 64, 96)


def test_upscale_portrait_without_faces(pack, model):
    pack.utils.UPDATES.clear()
    lq = _as_image(_photo("t1.jpg"), (64, 44))
    image, mask = pack.nodes["HeadsUpUpscale"].execute(model=model, image=lq, scale=4.0, tile_size=0,
                                                        color_fix="adain").result
    assert image.shape == (1, 176, 256, 3) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert mask.shape == (1, 176, 256) and float(mask.abs().max()) == 0.0  # no face analysis: no mask
    assert pack.utils.UPDATES and pack.utils.UPDATES[-1][0] == pack.utils.UPDATES[-1][1]


def test_batch_equals_images_one_at_a_time(pack, model, faces):
    lq = torch.cat([_as_image(_photo("t1.jpg"), (40, 28)), _as_image(_photo("t1.jpg").transpose(0), (40, 28))])
    run = pack.nodes["HeadsUpUpscale"].execute
    both, masks = run(model=model, image=lq, scale=2.0, tile_size=0, color_fix="adain", face_analysis=faces).result
    for i in range(2):
        one, mask = run(model=model, image=lq[i:i + 1], scale=2.0, tile_size=0, color_fix="adain",
                        face_analysis=faces).result
        assert torch.allclose(both[i:i + 1], one, atol=1e-5) and torch.allclose(masks[i:i + 1], mask, atol=1e-5)


def test_reference_encoder_and_upscale_with_reference(pack, model, faces):
    tom = _as_image(_photo("Tom_Hanks_54745.png"))
    ref, preview = pack.nodes["HeadsUpReferenceEncoder"].execute(image=tom, face_analysis=faces).result
    assert preview.shape == (1, 512, 512, 3) and float(preview.std()) > 0.01
    assert len(ref.references) == 1 and ref.analyzer is faces
    # The portrait is the reference face itself, shrunk: it must be found, masked and matched.
    lq = _as_image(_photo("Tom_Hanks_54745.png"), (48, 48))
    image, mask = pack.nodes["HeadsUpUpscale"].execute(model=model, image=lq, scale=4.0, tile_size=0,
                                                        color_fix="adain", reference=ref).result
    assert image.shape == (1, 192, 192, 3) and mask.shape == (1, 192, 192)
    assert float(mask.max()) > 0.5 and float(mask[:, :4, :4].max()) < 0.5  # face centre masked, corner not


def test_chained_encoders_make_a_group(pack, faces):
    tom = _as_image(_photo("Tom_Hanks_54745.png"))
    other = _as_image(_photo("t1.jpg").crop((0, 0, 400, 400)), (112, 112))
    first, _ = pack.nodes["HeadsUpReferenceEncoder"].execute(image=tom, face_analysis=faces).result
    both, _ = pack.nodes["HeadsUpReferenceEncoder"].execute(image=other, face_analysis=faces, previous=first).result
    assert len(both.references) == 2 and both.references[0] is first.references[0]


def test_reference_without_a_face_is_a_clear_error(pack, faces):
    black = torch.zeros(1, 64, 64, 3)
    with pytest.raises(FaceError, match="image"):
        pack.nodes["HeadsUpReferenceEncoder"].execute(image=black, face_analysis=faces)


def test_facexlib_backend_loads_from_facedetection(pack):
    analyzer = pack.nodes["HeadsUpFaceAnalysisLoader"].execute(
        backend="facexlib", pack="facexlib/retinaface_mobile0.25", provider="CPU")[0]
    assert analyzer.detect(np.zeros((64, 64, 3), np.uint8)) == []


def test_conditioning_of_the_wrong_width_is_refused_by_the_core(pack, model):
    from headsup_core.errors import InputImageError

    with pytest.raises(InputImageError, match="needs Bx77x32"):
        pack.nodes["HeadsUpUpscale"].execute(model=model, image=torch.rand(1, 16, 16, 3), scale=2.0, tile_size=0,
                                             color_fix="adain", conditioning=[[torch.randn(1, 77, 768), {}]])


def test_native_patch_tensors_match_the_core_merge(pack, tiny):
    """The pure-tensor half of HeadsUpPatchModel (no ComfyUI needed): LoRA dicts in ComfyUI's diffusers-style
    naming, and OSEDiff's conv_in LoRA merged exactly as the core's converter merges it."""
    from headsup_core.loading.weights import convert_osediff, load_headsup, load_weights

    import importlib

    cm = importlib.import_module(harness.PACK_MODULE + ".nodes.comfy_model")
    w = load_weights(tiny["headsup"])
    groups = {a: [m for m in mods if m != "conv_in"] for a, mods in w.unet_groups.items()}
    lora_sd, modules = cm._lora_dict(w.unet_state, groups, w.alpha_unet)
    assert len(modules) == sum(len(v) for v in groups.values()) > 0
    m = modules[0]
    adapter = next(a for a, mods in groups.items() if m in mods)
    assert torch.equal(lora_sd[f"{m}.lora_A.weight"], w.unet_state[f"{m}.lora_A.{adapter}.weight"])
    assert float(lora_sd[f"{m}.alpha"]) == w.alpha_unet and len(lora_sd) == 3 * len(modules)

    pkl = load_weights(tiny["osediff"])
    weight, bias = cm.conv_in_of(pkl.unet_state)
    converted = load_headsup(convert_osediff(tiny["osediff"], Path(str(tiny["osediff"]) + ".test.safetensors")))
    assert torch.allclose(weight, converted.unet_state["conv_in.weight"][:, :4], atol=1e-6)
    assert torch.equal(bias.float(), converted.unet_state["conv_in.bias"].float())


def test_face_loader_auto_prefers_the_installed_pack_then_dlib(pack):
    """auto takes the insightface pack chosen in the widget when it is on disk; with a pack that is not on disk
    it falls back to dlib (installed with the pack), which finds the six real faces of t1.jpg."""
    loader = pack.nodes["HeadsUpFaceAnalysisLoader"]
    backend_input = {i.id: i for i in loader.GET_SCHEMA().inputs}["backend"]
    assert backend_input.options[0] == "auto" and backend_input.default == "auto"
    assert {"insightface", "facexlib", "dlib"} <= set(backend_input.options)

    with_pack = loader.execute(backend="auto", pack="tiny", provider="auto")[0]
    assert type(with_pack).__name__ == "InsightFaceAnalyzer" and "insightface" in with_pack.auto_note

    fallback = loader.execute(backend="auto", pack="antelopev2", provider="auto")[0]  # not on disk
    assert "dlib" in fallback.auto_note
    explicit = loader.execute(backend="dlib", pack="antelopev2", provider="CPU")[0]
    assert type(explicit) is type(fallback) and type(fallback).__name__ == "DlibAnalyzer"
    assert len(fallback.detect(np.asarray(_photo("t1.jpg")))) == 6


def test_osediff_weights_say_the_reference_is_ignored(pack, faces, caplog):
    """OSEDiff's conv_in has zero reference/mask weights: the node logs it, shows it on the node, and returns
    exactly the reference-free result with an empty mask."""
    import logging

    handle = pack.nodes["HeadsUpLoader"].execute(weights="osediff.pkl", base="diffusers/base", dtype="fp32")[0]
    tom = _as_image(_photo("Tom_Hanks_54745.png"))
    ref, _ = pack.nodes["HeadsUpReferenceEncoder"].execute(image=tom, face_analysis=faces).result
    lq = _as_image(_photo("Tom_Hanks_54745.png"), (32, 32))
    with caplog.at_level(logging.INFO):
        out = pack.nodes["HeadsUpUpscale"].execute(model=handle, image=lq, scale=2.0, tile_size=0,
                                                   color_fix="adain", reference=ref)
    plain, _ = pack.nodes["HeadsUpUpscale"].execute(model=handle, image=lq, scale=2.0, tile_size=0,
                                                    color_fix="adain").result
    image, mask = out.result
    assert torch.equal(image, plain) and float(mask.abs().max()) == 0
    assert "reference ignored" in out.ui["text"][0] and "conv_in" in out.ui["text"][0]
    assert "face mask not computed" in out.ui["text"][1]
    assert "reference ignored" in caplog.text and "similarity" not in caplog.text
    tip = {i.id: i for i in pack.nodes["HeadsUpUpscale"].GET_SCHEMA().inputs}["reference"].tooltip
    assert "OSEDiff" in tip and "ignore" in tip


def test_nodes_reserve_the_memory_of_the_plan_that_runs(pack, model, faces):
    """The upscale node reserves the estimate of the plan it then runs; the blend node the general model's plan
    for the whole image (no separate per-pixel guess)."""
    from headsup_core.options import UpscaleOptions

    lq = _as_image(_photo("t1.jpg"), (40, 28))
    opts = UpscaleOptions(scale=2.0, tile_size=128, color_fix="none", strength=1.0, match_threshold=0.3)
    pack.mm.LOADS.clear()
    pack.nodes["HeadsUpUpscale"].execute(model=model, image=lq, scale=2.0, tile_size=128, color_fix="none")
    assert [need for _, need, _ in pack.mm.LOADS] == [model.pipe.plan(lq, opts).estimate["activations"]]
    pack.mm.LOADS.clear()
    pack.nodes["HeadsUpBlendUpscale"].execute(general_model=model, face_model=model, face_analysis=faces, image=lq,
                                              scale=2.0, tile_size=128, color_fix="none", feather=0.0)
    assert [need for _, need, _ in pack.mm.LOADS][:1] == [model.pipe.plan(lq, opts).estimate["activations"]]
