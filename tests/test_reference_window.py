"""Reference latents are encoded per face window, so the same face gives the same latent whatever the canvas size
(the whole-canvas encode it replaces did not: the VAE's GroupNorm saw the empty canvas too)."""

import numpy as np
import pytest
import torch

from headsup_core.faces import DetectedFace, Reference
from headsup_core.faces.condition import build_face_condition, encode_reference_windows, reference_window

ARC = np.array([[38.29, 51.70], [73.53, 51.50], [56.03, 71.74], [41.55, 92.37], [70.73, 92.20]], np.float32)


def _ref():
    rng = np.random.default_rng(0)
    crop = (rng.random((128, 128, 3)) * 255).astype(np.uint8)
    return Reference(crop=crop, kps=ARC * 128 / 112, embedding=None)


def _cond(size, offset):
    kps = ARC * 0.4 + offset  # a ~25 px face in LQ pixels
    face = DetectedFace(bbox=np.array([*(kps.min(0) - 8), *(kps.max(0) + 8)], np.float32), kps=kps,
                        det_score=1.0, embedding=None)
    return build_face_condition(np.zeros((size, size, 3), np.uint8), (size * 4, size * 4), None, _ref(),
                                faces=[face])


def test_window_is_face_sized_on_the_grid_and_inside():
    w = reference_window((100.0, 30.0), 90.0, (200, 300))
    assert w[2] - w[0] == w[3] - w[1] == 96 and all(v % 8 == 0 for v in w)
    assert w[1] == 0  # shifted inside the image at the top edge
    assert reference_window((10.0, 10.0), 500.0, (64, 64)) == [0, 0, 64, 64]  # larger than the image: clipped


@pytest.fixture(scope="module")
def encoder():
    from diffusers import AutoencoderKL

    from headsup_core.testing.tiny_models import TINY_VAE

    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE).eval()
    return lambda x: vae.encode(x).latent_dist.mode() * 0.18215


def test_same_face_same_latent_on_any_canvas(encoder):
    small, big = _cond(100, np.array([30.0, 30.0])), _cond(200, np.array([110.0, 70.0]))  # +320, +160 px
    ws, wb = small.assignments[0]["ref_window"], big.assignments[0]["ref_window"]
    assert ws[2] - ws[0] == wb[2] - wb[0] < 400 and ws[0] > 0 and ws[1] > 0
    dx, dy = (wb[0] - ws[0]) // 8, (wb[1] - ws[1]) // 8
    with torch.no_grad():
        ls = encode_reference_windows(small.canvas, [ws], encoder, (50, 50))
        lb = encode_reference_windows(big.canvas, [wb], encoder, (100, 100))
        whole_s, whole_b = encoder(small.canvas), encoder(big.canvas)
    n = (ws[2] - ws[0]) // 8
    ys, xs = slice(ws[1] // 8, ws[1] // 8 + n), slice(ws[0] // 8, ws[0] // 8 + n)
    yb, xb = slice(ys.start + dy, ys.stop + dy), slice(xs.start + dx, xs.stop + dx)
    win = (ls[..., ys, xs] - lb[..., yb, xb]).abs().max().item()
    whole = (whole_s[..., ys, xs] - whole_b[..., yb, xb]).abs().max().item()  # global GroupNorm statistics
    print(f"window {win:.2e}, whole canvas {whole:.2e}")
    assert whole > 10 * win  # (the placed crops differ in a few edge pixels: warp rounding)
    outside = torch.ones_like(lb, dtype=torch.bool)
    outside[..., yb, xb] = False
    assert lb[..., yb, xb].abs().amax() > 0 and torch.count_nonzero(lb[outside]) == 0  # nothing outside the window


def test_no_windows_gives_none_and_overlaps_average(encoder):
    assert encode_reference_windows(torch.zeros(1, 3, 64, 64), [], encoder, (8, 8)) is None
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        one = encode_reference_windows(x, [[0, 0, 32, 32]], encoder, (8, 8))
        two = encode_reference_windows(x, [[0, 0, 32, 32], [0, 0, 32, 32]], encoder, (8, 8))
    assert torch.allclose(one, two, atol=1e-6)
