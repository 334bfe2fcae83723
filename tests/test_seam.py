"""The seam score: ~0 for the GT, higher for a hard paste than for a feathered one, blind to uniform noise."""
import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from headsup_core.eval.seam import boundary_regions, seam_score  # noqa: E402
from eval_util import t1_small  # noqa: E402


@pytest.fixture(scope="module")
def scene():
    gt = t1_small(320).astype(np.float32)
    h, w = gt.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    hard = (((xx - 160) / 60.0) ** 2 + ((yy - 110) / 75.0) ** 2 <= 1).astype(np.float32)
    # a "face model" output: same content, other colour balance and a touch of its own texture
    rng = np.random.default_rng(0)
    face = np.clip(gt * np.array([1.12, 0.95, 0.9]) + 10 + rng.normal(0, 2, gt.shape), 0, 255)
    return gt, face, hard


def _paste(gt, face, mask):
    return np.clip(mask[..., None] * face + (1 - mask[..., None]) * gt, 0, 255).astype(np.uint8)


def test_gt_scores_zero(scene):
    gt, _, hard = scene
    s = seam_score(gt.astype(np.uint8), gt.astype(np.uint8), hard)
    assert s["seam"] == 0.0 and s["seam_colour"] == 0.0


def test_hard_paste_scores_higher_than_feathered(scene):
    gt, face, hard = scene
    feathered = cv2.GaussianBlur(hard, (0, 0), 6)
    s_hard = seam_score(_paste(gt, face, hard), gt.astype(np.uint8), hard)
    s_soft = seam_score(_paste(gt, face, feathered), gt.astype(np.uint8), hard)
    assert s_hard["seam"] > 2 * s_soft["seam"]
    assert s_hard["seam"] > 1.0  # a visible step, in 8-bit levels per pixel
    assert s_hard["seam_colour"] > 5.0


def test_uniform_noise_is_not_a_seam(scene):
    gt, _, hard = scene
    noisy = np.clip(gt + np.random.default_rng(1).normal(0, 8, gt.shape), 0, 255).astype(np.uint8)
    s = seam_score(noisy, gt.astype(np.uint8), hard)
    assert s["ring"] > 1.0  # the error is there ...
    assert s["seam"] < 0.1 * s["ring"]  # ... but not concentrated on the boundary


def test_regions_and_empty_mask(scene):
    gt, _, hard = scene
    ring, inner, outer = boundary_regions(hard, 3)
    assert ring.any() and inner.any() and outer.any()
    assert not (ring & inner).any() and not (ring & outer).any()
    assert hard[inner].min() == 1 and hard[outer].max() == 0
    empty = seam_score(gt.astype(np.uint8), gt.astype(np.uint8), np.zeros(gt.shape[:2]))
    assert empty == {"seam": 0.0, "seam_colour": 0.0, "ring": 0.0, "bands": 0.0}
