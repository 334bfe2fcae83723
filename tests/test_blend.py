"""The blending baseline on the tiny models: exact output sizes on t1.jpg, untouched background, seams."""
import numpy as np
import pytest
import torch

pytest.importorskip("cv2")
pytest.importorskip("insightface")

from headsup_core.errors import InputImageError  # noqa: E402
from headsup_core.blend import _feather_mask, blend_upscale, face_crop_transform, paste_face  # noqa: E402
from eval_util import t1_path, t1_small  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models  # built once per session in conftest.py


@pytest.fixture(scope="module")
def models(tiny):
    from headsup_core.faces import load_face_analyzer
    from headsup_core.pipeline import HeadsUpPipeline

    general = HeadsUpPipeline.from_files(tiny["base"], weights=tiny["osediff"], device="cpu")
    face = HeadsUpPipeline.from_files(tiny["base"], weights=tiny["headsup"], device="cpu")
    analyzer = load_face_analyzer("insightface", model_root=tiny["insightface_root"], pack="tiny")
    return general, face, analyzer


@pytest.mark.parametrize("scale", [2.0, 1.5])
def test_blend_exact_size_on_t1(models, scale):
    from PIL import Image

    general, face, analyzer = models
    lq = Image.fromarray(t1_small(401))  # odd width: 401 x 278
    out, info = blend_upscale(lq, general, face, scale, analyzer, return_info=True)
    assert isinstance(out, Image.Image)
    assert out.size == (round(401 * scale), round(lq.height * scale))
    assert info["face_mask"].shape == (1, 1, out.height, out.width)
    assert len(info["faces"][0]) >= 1  # the tiny pack finds a face on t1.jpg, so a crop was pasted
    assert float(info["face_mask"].max()) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.slow
def test_blend_full_size_t1(models):
    from PIL import Image

    general, face, analyzer = models
    lq = Image.open(t1_path()).convert("RGB")
    out = blend_upscale(lq, general, face, 1.5, analyzer)
    assert out.size == (1920, 1329)


def test_background_is_the_general_models_output(models):
    general, face, analyzer = models
    lq = t1_small(256)
    out, info = blend_upscale(lq, general, face, 2.0, analyzer, return_info=True)
    plain = general.upscale(lq, scale=2.0)
    assert isinstance(out, np.ndarray) and out.shape == plain.shape
    outside = info["face_mask"][0, 0].numpy() == 0
    assert outside.any()
    assert np.array_equal(out[outside], plain[outside])
    assert not np.array_equal(out, plain)  # the faces did change


def test_blend_batch_tensor_matches_single(models):
    general, face, analyzer = models
    lq = t1_small(192)
    x = torch.from_numpy(lq.copy()).float().div(255)[None].repeat(2, 1, 1, 1)
    out = blend_upscale(x, general, face, 2.0, analyzer)
    single = blend_upscale(lq, general, face, 2.0, analyzer)
    assert out.shape == (2, lq.shape[0] * 2, lq.shape[1] * 2, 3)
    torch.testing.assert_close(out[0], out[1], atol=1e-5, rtol=0)  # batch order may change float sums, not pixels
    as_u8 = (out[0] * 255).round().to(torch.uint8).numpy().astype(int)
    assert np.abs(as_u8 - single.astype(int)).max() <= 1


def test_blend_needs_faces(models):
    general, face, _ = models
    with pytest.raises(InputImageError, match="face analyzer"):
        blend_upscale(t1_small(64), general, face, 2.0, None)


def test_feathered_paste_has_smaller_seam_than_hard_paste():
    """The paste machinery itself, measured with the seam score against the GT it was cut from."""
    import cv2

    from headsup_core.eval.seam import seam_score

    gt = t1_small(320)
    kps = np.array([[140, 95], [180, 95], [160, 118], [145, 140], [175, 140]], np.float32)  # synthetic face
    m_out, _ = face_crop_transform((kps + 0.5) / 2 - 0.5, 2.0)
    crop = cv2.warpAffine(gt, m_out, (512, 512), flags=cv2.INTER_CUBIC)
    shifted = np.clip(crop.astype(np.float32) * [1.15, 0.95, 0.9] + 12, 0, 255).astype(np.uint8)
    region = np.zeros(gt.shape[:2], np.float32)
    hard = paste_face(gt.copy(), shifted, m_out, _feather_mask(512, 16, 0), region)
    soft = paste_face(gt.copy(), shifted, m_out, _feather_mask(512, 16, 48))
    boundary = (region >= 0.5).astype(np.float32)
    s_hard, s_soft = seam_score(hard, gt, boundary)["seam"], seam_score(soft, gt, boundary)["seam"]
    assert s_hard > 2 * s_soft
    assert seam_score(gt, gt, boundary)["seam"] == 0.0


@pytest.mark.slow
def test_blend_node_through_the_comfy_stand_in(tiny, tmp_path_factory):
    """nodes/blend_node.py executed like the other nodes, inside the pack loaded by the ComfyUI stand-in."""
    import importlib
    import os
    import sys
    from pathlib import Path

    stub = str(Path(__file__).parent / "comfy_stub")
    sys.path.insert(0, stub)
    import harness

    sys.path.remove(stub)
    models = tmp_path_factory.mktemp("comfy_models")
    for sub in ("headsup", "checkpoints", "diffusers"):
        (models / sub).mkdir()
    os.symlink(tiny["headsup"], models / "headsup" / "headsup.safetensors")
    os.symlink(tiny["osediff"], models / "headsup" / "osediff.pkl")
    os.symlink(tiny["base"], models / "diffusers" / "base", target_is_directory=True)
    os.symlink(tiny["insightface_root"], models / "insightface", target_is_directory=True)
    pack = harness.load_pack(models)
    try:
        node = importlib.import_module(f"{harness.PACK_MODULE}.nodes.blend_node").HeadsUpBlendUpscale
        schema = node.GET_SCHEMA() if hasattr(node, "GET_SCHEMA") else node.define_schema()
        assert schema.node_id == "HeadsUpBlendUpscale"
        general = pack.nodes["HeadsUpLoader"].execute(weights="osediff.pkl", base="diffusers/base", dtype="auto")[0]
        face = pack.nodes["HeadsUpLoader"].execute(weights="headsup.safetensors", base="diffusers/base",
                                                   dtype="auto")[0]
        analysis = pack.nodes["HeadsUpFaceAnalysisLoader"].execute(backend="insightface", pack="tiny",
                                                                   provider="auto")[0]
        x = torch.from_numpy(t1_small(160).copy()).float().div(255)[None]
        out = node.execute(general, face, analysis, x, 2.0, 0, "adain", 24.0)
        image, mask = out[0], out[1]
        assert image.shape == (1, x.shape[1] * 2, 320, 3) and mask.shape == (1, x.shape[1] * 2, 320)
        assert float(mask.max()) > 0.5
    finally:
        harness.unload()
