"""The torch dlib face network read from the wheel's .dat matches dlib's own C++ descriptor on real faces
(insightface's t1.jpg, and two deepface photos when ../shared/data/faces-deepface is present)."""
from pathlib import Path

import numpy as np
import pytest
import torch

dlib = pytest.importorskip("dlib")

from headsup_core.errors import FaceError, WeightsError  # noqa: E402
from headsup_core.faces import load_identity_network  # noqa: E402
from headsup_core.faces import dlib_backend  # noqa: E402
from headsup_core.imageio import to_uint8_rgb  # noqa: E402
from headsup_core.files.read import load_image  # noqa: E402

DEEPFACE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "faces-deepface"


@pytest.fixture(scope="module")
def dlib_models():
    if not dlib_backend.available():
        pytest.skip("face-recognition-models is not installed")
    d = dlib_backend.default_model_dir()
    return (dlib.get_frontal_face_detector(), dlib.shape_predictor(str(d / dlib_backend.PREDICTOR_FILE)),
            dlib.face_recognition_model_v1(str(d / dlib_backend.RECOGNIZER_FILE)))


def _chips(img, models, limit=None):
    det, sp, _ = models
    rects = sorted(det(img, 1), key=lambda r: -r.area())[:limit]
    return [dlib.get_face_chip(img, sp(img, r), 150, 0.25) for r in rects]


def _check(chips, models, net):
    rec = models[2]
    ref = np.stack([np.asarray(rec.compute_face_descriptor(c)) for c in chips])
    with torch.no_grad():
        ours = net(torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2).float()).double().numpy()
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    rel = np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.999 and rel.max() <= 0.01, (cos.min(), rel.max())
    return ours, ref


def test_t1_faces_match_dlib(dlib_models, t1_jpg):
    net = load_identity_network("dlib")
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    chips = _chips(to_uint8_rgb(load_image(t1_jpg)), dlib_models)
    assert len(chips) == 6
    ours, ref = _check(chips, dlib_models, net)
    # identity distances (what dlib's 0.6 rule uses) agree to 3 decimals
    d_ours = np.linalg.norm(ours[:, None] - ours[None], axis=2)
    d_ref = np.linalg.norm(ref[:, None] - ref[None], axis=2)
    assert np.abs(d_ours - d_ref).max() < 5e-4


@pytest.mark.skipif(not DEEPFACE.is_dir(), reason="../shared/data/faces-deepface is not present")
def test_deepface_same_person_distance_matches_dlib(dlib_models):
    net = load_identity_network("dlib")
    chips = [_chips(to_uint8_rgb(load_image(DEEPFACE / n)), dlib_models, 1)[0] for n in ("img1.jpg", "img2.jpg")]
    ours, ref = _check(chips, dlib_models, net)
    assert round(float(np.linalg.norm(ours[0] - ours[1])), 3) == round(float(np.linalg.norm(ref[0] - ref[1])), 3)


def test_differentiable_batched_and_fresh(dlib_models):
    net = load_identity_network("dlib")
    x = (torch.rand(2, 3, 150, 150) * 255).requires_grad_(True)
    y = net(x)
    assert y.shape == (2, 128)
    y[0].sum().backward()
    assert x.grad is not None and x.grad[0].abs().sum() > 0 and x.grad[1].abs().sum() == 0  # no batch mixing
    with torch.no_grad():
        assert torch.allclose(net(x[1:].detach()), y[1:].detach(), atol=1e-5)
    other = load_identity_network("dlib")  # a fresh module each call, same weights
    assert other is not net and torch.equal(other.fc.weight, net.fc.weight)
    with pytest.raises(ValueError, match="150x150"):
        net(torch.zeros(1, 3, 112, 112))
    with pytest.raises(FaceError, match="Unknown identity network"):
        load_identity_network("nope")


def test_corrupt_file_is_a_weights_error(dlib_models, tmp_path):
    src = (dlib_backend.default_model_dir() / dlib_backend.RECOGNIZER_FILE).read_bytes()
    (tmp_path / dlib_backend.RECOGNIZER_FILE).write_bytes(src[: len(src) // 2])
    with pytest.raises(WeightsError, match="not a dlib face-recognition network"):
        load_identity_network("dlib", model_root=tmp_path)
