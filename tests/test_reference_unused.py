"""Weights that cannot use a reference (OSEDiff: the extra conv_in input channels are zero) say so once and skip
the reference work, in the library and the CLI (the nodes and A1111 are checked in their own test files)."""
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

insightface = pytest.importorskip("insightface")
pytest.importorskip("onnxruntime")
cv2 = pytest.importorskip("cv2")

from headsup_core.model import conditioning_in_use  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
IMAGES = Path(insightface.__file__).parent / "data" / "images"


class CountingAnalyzer:
    """The tiny insightface analyzer, counting every face-analysis call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def detect(self, image):
        self.calls += 1
        return self.inner.detect(image)

    def embed(self, image, kps):
        self.calls += 1
        return self.inner.embed(image, kps)


@pytest.fixture(scope="module")
def setup(tiny_models):
    from headsup_core.faces import load_face_analyzer
    from headsup_core.imageio import to_uint8_rgb
    from headsup_core.files.read import load_image

    analyzer = load_face_analyzer("insightface", model_root=tiny_models["insightface_root"], pack="tiny",
                                  device="cpu")
    tom = to_uint8_rgb(load_image(IMAGES / "Tom_Hanks_54745.png"))
    group = to_uint8_rgb(load_image(IMAGES / "t1.jpg"))
    other = cv2.resize(group[100:400, 500:800], (112, 112), interpolation=cv2.INTER_AREA)
    return analyzer, tom, np.concatenate([tom, other], axis=1)


def test_conditioning_in_use_reads_the_extra_conv_in_channels():
    w = torch.zeros(8, 9, 3, 3)
    w[:, :4] = 1
    assert conditioning_in_use(w) == {"reference": False, "mask": False}
    w[0, 5, 1, 1] = 1e-6
    assert conditioning_in_use(w) == {"reference": True, "mask": False}
    w[:, 4:8], w[3, 8, 0, 0] = 0, -1
    assert conditioning_in_use(w) == {"reference": False, "mask": True}
    assert conditioning_in_use(torch.ones(8, 4, 3, 3)) == {"reference": False, "mask": False}
    assert conditioning_in_use(None) == {"reference": False, "mask": False}


def test_osediff_reference_is_ignored_once_with_no_face_work(tiny_models, setup, caplog):
    from headsup_core.pipeline import HeadsUpPipeline

    analyzer, tom, lq = setup
    pipe = HeadsUpPipeline.from_files(tiny_models["base"], tiny_models["osediff"], device="cpu")
    assert pipe.conditioning_in_use() == {"reference": False, "mask": False}
    spy = CountingAnalyzer(analyzer)
    plain = pipe.upscale(lq, scale=2)
    with caplog.at_level(logging.WARNING, logger="headsup"):
        out, info = pipe.upscale(lq, scale=2, reference=[tom], face_analyzer=spy, return_info=True)
        again, _ = pipe.upscale(lq, scale=2, reference=[tom], face_analyzer=spy, return_info=True)
    assert np.array_equal(out, plain) and np.array_equal(again, plain)
    assert spy.calls == 0  # no detection, no matching, no reference identity
    assert info["reference_used"] is False and "conv_in" in info["reference_note"]
    assert info["assignments"] == [[]] and float(info["face_mask"].abs().max()) == 0
    assert info["face_mask_used"] is False
    assert caplog.text.count("reference is ignored") == 1  # said once per pipeline
    _, info3 = pipe.upscale(lq, scale=2, return_info=True)
    assert info3["reference_used"] is False and info3["reference_note"] == "no reference given"


def test_zero_reference_channels_keep_the_mask_zero_mask_channel_skips_it(tiny_models, setup):
    from headsup_core.pipeline import HeadsUpPipeline

    analyzer, tom, lq = setup
    pipe = HeadsUpPipeline.from_files(tiny_models["base"], tiny_models["headsup"], device="cpu")
    _, full = pipe.upscale(lq, scale=2, reference=[tom], face_analyzer=analyzer, return_info=True)
    assert full["reference_used"] is True and full["reference_note"] is None
    with torch.no_grad():
        pipe.model.unet.conv_in.weight[:, 4:8] = 0  # reference channels never trained; the mask channel is
    spy = CountingAnalyzer(analyzer)
    _, info = pipe.upscale(lq, scale=2, reference=[tom], face_analyzer=spy, return_info=True)
    assert info["reference_used"] is False and "conv_in" in info["reference_note"]
    faces = info["assignments"][0]
    assert len(faces) == 2 and all(a["reference_index"] is None for a in faces)
    assert float(info["face_mask"].max()) > 0.9 and info["face_mask_used"] is True
    with torch.no_grad():
        pipe.model.unet.conv_in.weight[:, 8:] = 0
    spy.calls = 0
    _, info = pipe.upscale(lq, scale=2, face_analyzer=spy, return_info=True)
    assert spy.calls == 0 and info["assignments"] == [[]] and float(info["face_mask"].abs().max()) == 0


def test_cli_says_the_reference_is_ignored_and_skips_it(tiny_models, tmp_path, capsys):
    from PIL import Image

    from headsup_core.cli import main

    Image.open(IMAGES / "t1.jpg").convert("RGB").resize((64, 44)).save(tmp_path / "in.png")
    argv = ["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"), "--scale", "2", "--base",
            str(tiny_models["base"]), "--weights", str(tiny_models["osediff"]), "--reference",
            str(IMAGES / "Tom_Hanks_54745.png"), "--faces", "insightface", "--face-models",
            str(tiny_models["insightface_root"]), "--face-pack", "tiny"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "reference ignored" in out and "conv_in" in out
    assert "sim" not in out and "face(s)" not in out  # no matching report, no face analysis
    assert Image.open(tmp_path / "out.png").size == (128, 88)
