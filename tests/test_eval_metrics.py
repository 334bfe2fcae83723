"""Metric sanity on known cases, offline weight lookup, and missing weights reported instead of raised."""
import math
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pyiqa")

from headsup_core.eval.metrics import PSNR_CAP_DB, MetricSuite, face_metrics, offline_weights, psnr_y  # noqa: E402

Y_GAIN = (65.481 + 128.553 + 24.966) / 255.0  # how equal RGB noise shows up in BT.601 Y


@pytest.fixture
def no_network(monkeypatch):
    calls = []

    def refuse(self, address, *a, **k):
        calls.append(address)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return calls


def _gray_with_noise(sigma, size=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(1, 1, size, size, generator=g, dtype=torch.float64)
    n = n / n.pow(2).mean().sqrt() * sigma  # exactly this RMS, so the expected PSNR is exact
    gt = torch.full((1, 3, size, size), 0.5, dtype=torch.float64)
    return (gt + n).float(), gt.float()


def test_identical_images_psnr_capped_ssim_one(tmp_path, no_network):
    suite = MetricSuite(("psnr", "ssim"), weights_root=tmp_path, crop_border=4)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    vals = suite.full_reference(x, x)
    assert vals["psnr"] == pytest.approx(PSNR_CAP_DB, abs=1e-3)
    assert vals["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert psnr_y(x, x) == math.inf
    assert not no_network


@pytest.mark.parametrize("sigma", [0.01, 0.05])
def test_known_noise_level_gives_expected_psnr(tmp_path, sigma):
    sr, gt = _gray_with_noise(sigma)
    assert 0 < sr.min() and sr.max() < 1  # no clipping, so the noise level is exact
    expected = -20 * math.log10(Y_GAIN * sigma)
    suite = MetricSuite(("psnr",), weights_root=tmp_path, crop_border=0)
    assert suite.full_reference(sr, gt)["psnr"] == pytest.approx(expected, abs=0.01)
    assert psnr_y(sr, gt) == pytest.approx(expected, abs=0.01)


def test_missing_weights_are_reported_not_raised(tmp_path, no_network):
    suite = MetricSuite(("psnr", "lpips", "niqe", "musiq"), weights_root=tmp_path / "empty")
    assert suite.available == ["psnr"]
    assert "niqe_modelparameters.mat" in suite.notes["niqe"]
    assert str(tmp_path / "empty" / "pyiqa") in suite.notes["niqe"]
    assert "alexnet-owt-7be5be79.pth" in suite.notes["lpips"]
    x = torch.rand(1, 3, 64, 64)
    assert suite.full_reference(x, x)["lpips"] is None
    assert suite.no_reference(x) == {"niqe": None, "musiq": None}
    assert not no_network, "a metric tried the network"


def test_offline_context_restores_globals(tmp_path):
    import torch.hub

    before = (torch.hub.get_dir(), torch.load, torch.hub.download_url_to_file, os.environ.get("HF_HUB_OFFLINE"))
    with offline_weights(tmp_path) as root:
        assert torch.hub.get_dir() == str(root)
        with pytest.raises(RuntimeError, match="missing weights file x.pth"):
            torch.hub.download_url_to_file("https://example.invalid/x.pth", str(root / "x.pth"))
    assert (torch.hub.get_dir(), torch.load, torch.hub.download_url_to_file,
            os.environ.get("HF_HUB_OFFLINE")) == before


def test_lpips_found_in_metrics_root_is_zero_for_identical_images(tmp_path, no_network):
    """Weights placed in the configured root are used offline (random backbone: only LPIPS(x, x) = 0 is known)."""
    torchvision = pytest.importorskip("torchvision")
    lpips = pytest.importorskip("lpips")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "pyiqa").mkdir()
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet().state_dict(), tmp_path / "checkpoints" / "alexnet-owt-7be5be79.pth")
    shutil.copy(Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth",
                tmp_path / "pyiqa" / "LPIPS_v0.1_alex-df73285e.pth")
    suite = MetricSuite(("lpips",), weights_root=tmp_path)
    assert suite.available == ["lpips"], suite.notes
    x, _ = _gray_with_noise(0.0 + 0.05)
    y = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    assert suite.full_reference(x, x)["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert suite.full_reference(y, x)["lpips"] > 1e-4
    assert not no_network


def test_face_metrics_identical_and_degraded(tmp_path):
    """Face PSNR is capped for identical faces and drops with noise; ID similarity is ~1 for identical faces."""
    from headsup_core.faces import load_face_analyzer
    from headsup_core.testing.tiny_faces import write_tiny_face_models
    from eval_util import t1_small

    write_tiny_face_models(tmp_path)
    analyzer = load_face_analyzer("insightface", model_root=tmp_path / "insightface", pack="tiny")
    gt = t1_small(320)
    means, rows = face_metrics(gt, gt, analyzer)
    assert means["faces"] >= 1 and rows[0]["face_psnr"] == PSNR_CAP_DB
    assert means["id_sim"] == pytest.approx(1.0, abs=1e-4)
    noisy = np.clip(gt.astype(np.int16) + np.random.default_rng(0).integers(-20, 21, gt.shape), 0, 255)
    worse, _ = face_metrics(noisy.astype(np.uint8), gt, analyzer)
    assert worse["face_psnr"] < 35


class _NotATensor:
    pass


def test_metric_file_with_pickled_objects_is_refused(tmp_path, no_network):
    """pyiqa asks for weights_only=False; inside our context every metric file is loaded weights_only=True."""
    (tmp_path / "pyiqa").mkdir()
    torch.save({"params": _NotATensor()}, tmp_path / "pyiqa" / "musiq_koniq_ckpt-e95806b9.pth")
    suite = MetricSuite(("musiq",), weights_root=tmp_path)
    assert suite.available == []
    assert "weights_only=True" in suite.notes["musiq"]
