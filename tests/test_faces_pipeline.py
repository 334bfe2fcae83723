"""Faces through the whole pipeline with the tiny models: a two-person picture with two references reports each
reference on its own face; reference-free runs still work."""
from pathlib import Path

import numpy as np
import pytest

insightface = pytest.importorskip("insightface")
pytest.importorskip("onnxruntime")
cv2 = pytest.importorskip("cv2")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
IMAGES = Path(insightface.__file__).parent / "data" / "images"


@pytest.fixture(scope="module")
def tiny_all(tiny_models):
    return tiny_models  # built once per session in conftest.py


@pytest.fixture(scope="module")
def setup(tiny_all):
    from headsup_core.faces import load_face_analyzer
    from headsup_core.imageio import to_uint8_rgb
    from headsup_core.files.read import load_image
    from headsup_core.pipeline import HeadsUpPipeline

    pipe = HeadsUpPipeline.from_files(tiny_all["base"], tiny_all["headsup"], device="cpu")
    analyzer = load_face_analyzer("insightface", model_root=tiny_all["insightface_root"], pack="tiny", device="cpu")
    tom = to_uint8_rgb(load_image(IMAGES / "Tom_Hanks_54745.png"))
    group = to_uint8_rgb(load_image(IMAGES / "t1.jpg"))
    other = cv2.resize(group[100:400, 500:800], (112, 112), interpolation=cv2.INTER_AREA)
    return pipe, analyzer, tom, other


def test_two_references_each_on_its_own_face(setup):
    from headsup_core.faces import encode_reference

    pipe, analyzer, tom, other = setup
    lq = np.concatenate([tom, other], axis=1)  # two people side by side
    refs = [encode_reference(other, analyzer), encode_reference(tom, analyzer)]
    out, info = pipe.upscale(lq, scale=2, reference=refs, face_analyzer=analyzer, return_info=True)
    assert out.shape == (224, 448, 3) and out.dtype == np.uint8
    report = info["assignments"][0]
    assert [(a["face_index"], a["reference_index"]) for a in report] == [(0, 1), (1, 0)]
    assert all(a["similarity"] > 0.9 for a in report)
    mask = info["face_mask"][0, 0]
    for a in report:
        x1, y1, x2, y2 = (int(round(v)) for v in a["box"])
        assert float(mask[y1 + 2:y2 - 2, x1 + 2:x2 - 2].min()) > 0.9
    # Raw photos work too: each image given as a reference is one person.
    _, info2 = pipe.upscale(lq, scale=2, reference=[other, tom], face_analyzer=analyzer, return_info=True)
    assert [a["reference_index"] for a in info2["assignments"][0]] == [1, 0]


def test_reference_free_runs(setup):
    pipe, analyzer, tom, other = setup
    lq = np.concatenate([tom, other], axis=1)
    plain, info = pipe.upscale(lq, scale=2, return_info=True)
    assert plain.shape == (224, 448, 3) and info["assignments"] == [[]]
    masked, info = pipe.upscale(lq, scale=2, face_analyzer=analyzer, return_info=True)
    assert [a["reference_index"] for a in info["assignments"][0]] == [None, None]
    assert float(info["face_mask"].max()) > 0.99 and masked.shape == plain.shape
