"""Training losses: zero for identical inputs, growing with corruption; face losses see only face crops."""

import numpy as np
import pytest
import torch

from headsup_core.errors import MissingModelError, WeightsError
from headsup_core.train.losses import (ARCFACE_TEMPLATE, ArcFaceIdentity, FaceLosses, LPIPSLoss, PatchDiscriminator,
                                       discriminator_loss, face_align_matrix, image_losses)


@pytest.fixture(scope="module")
def lp():
    torch.manual_seed(0)
    return LPIPSLoss(net="squeeze", random=True)


@pytest.fixture(scope="module")
def arc():
    return ArcFaceIdentity(tiny=True, seed=0)


def _img(seed=0, b=1, h=96, w=128):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(b, 3, h // 8, w // 8, generator=g), size=(h, w), mode="bicubic")
    return (x * 2 - 1).clamp(-1, 1)


def _faces():
    # one face in the left half; its 5 landmarks are the ArcFace template scaled into the box
    kps = ARCFACE_TEMPLATE * (40 / 112) + np.array([10, 20], np.float32)
    boxes = torch.tensor([[0, 10, 20, 50, 60]], dtype=torch.float32)
    return {"boxes": boxes, "align": torch.from_numpy(face_align_matrix(kps))[None]}


def test_image_losses_zero_and_monotone(lp):
    x = _img()
    same = image_losses(x, x, lp)
    assert same["mse"].item() == 0 and same["lpips"].item() == pytest.approx(0, abs=1e-7)
    prev = {k: 0.0 for k in same}
    for s in (0.05, 0.2, 0.6):
        y = (x + s * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
        cur = {k: v.item() for k, v in image_losses(x, y, lp).items()}
        for k in cur:
            assert cur[k] > prev[k], (k, s)
        prev = cur


def test_lpips_reads_torchvision_backbone_file(tmp_path):
    from torchvision.models import squeezenet1_1

    torch.manual_seed(3)
    sd = {k: v for k, v in squeezenet1_1().state_dict().items() if k.startswith("features.")}
    torch.save(sd, tmp_path / "sq.pth")
    m = LPIPSLoss(net="squeeze", backbone_weights=tmp_path / "sq.pth")
    assert torch.equal(m.net.net.slice1[0].weight, sd["features.0.weight"])
    torch.save({"other": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="torchvision"):
        LPIPSLoss(net="squeeze", backbone_weights=tmp_path / "bad.pth")
    with pytest.raises(MissingModelError, match="missing.pth"):
        LPIPSLoss(net="squeeze", backbone_weights=tmp_path / "missing.pth")


def test_arcface_weights_errors(tmp_path):
    with pytest.raises(MissingModelError, match="ir_se50"):
        ArcFaceIdentity(tmp_path / "nope.pth")
    torch.save({"x": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="IR-SE50"):
        ArcFaceIdentity(tmp_path / "bad.pth")


def test_align_matrix_maps_landmarks_to_template():
    kps = ARCFACE_TEMPLATE * 2.5 + np.array([100, 50], np.float32)
    m = face_align_matrix(kps)
    mapped = kps @ m[:, :2].T + m[:, 2]
    assert np.abs(mapped - ARCFACE_TEMPLATE).max() < 1e-3


def test_face_losses_zero_grow_and_see_only_faces(lp, arc):
    fl = FaceLosses(lp, arc, PatchDiscriminator(16), w_adv=0.1)
    gt, faces = _img(), _faces()
    same, _ = fl(gt, gt, faces)
    for k in ("face_mse", "face_lpips", "face_id"):
        assert same[k].item() == pytest.approx(0, abs=1e-6), k
    noisy = gt.clone()
    noisy[..., 20:60, 10:50] += 0.3 * torch.randn(1, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    worse, _ = fl(noisy.clamp(-1, 1), gt, faces)
    for k in ("face_mse", "face_lpips", "face_id"):
        assert worse[k].item() > same[k].item() + 1e-6, k
    # changing pixels far from the face leaves every face loss unchanged, and gets no gradient
    far = gt.clone()
    far[..., :, 96:] = 1.0
    far.requires_grad_(True)
    out, _ = fl(far, gt, faces)
    for k in ("face_mse", "face_lpips", "face_id"):
        assert out[k].item() == pytest.approx(same[k].item(), abs=1e-6), k
    sum(out.values()).backward()
    assert far.grad[..., :, 96:].abs().max() == 0
    assert far.grad[..., 20:60, 10:50].abs().max() > 0


def test_no_faces_gives_zero_losses_with_graph(lp, arc):
    fl = FaceLosses(lp, arc, None)
    x = _img().requires_grad_(True)
    out, crops = fl(x, x.detach(), {"boxes": torch.zeros(0, 5), "align": torch.zeros(0, 2, 3)})
    assert crops is None and all(v.item() == 0 for v in out.values())
    sum(out.values()).backward()  # graph exists


def test_adversarial_step_separation():
    torch.manual_seed(0)
    d = PatchDiscriminator(16)
    fl = FaceLosses(None, None, d, w_mse=0, w_lpips=0, w_id=0, w_adv=1.0)
    sr = _img(1).requires_grad_(True)
    out, (fake, real) = fl(sr, _img(2), _faces())
    out["face_adv"].backward()
    assert sr.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.parameters())  # generator loss does not train D
    dl = discriminator_loss(d, fake, real)
    dl.backward()
    assert dl.item() > 0 and any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.parameters())
