"""Real-ESRGAN second-order degradation, in torch on the training device.

This follows Real-ESRGAN's ``RealESRGANDataset`` (kernel sampling) and ``RealESRGANModel.feed_data``
(the two passes) step by step, without basicsr (whose import of
``torchvision.transforms.functional_tensor`` is broken on current torchvision). Filtering and JPEG use kornia.

Every random choice is drawn **per image**, as OSEDiff does (it degrades one image at a time): kernels, resize
scale and mode, noise type and level, second blur on/off, final order and JPEG quality. Image ``i`` of a batch
degraded with ``seed`` uses its own generator seeded by ``image_seeds(seed, B)[i]``, so its LQ image depends only
on (seed, i) and its own pixels, never on the other images of the batch.

JPEG is a real (non-differentiable) encode/decode round trip through libjpeg (Pillow), as Real-ESRGAN's
``DiffJPEG(differentiable=False)`` rounds like a real codec; 4:2:0 chroma subsampling, as DiffJPEG.
``resize_back`` is OSEDiff's random-mode resize of the LQ image back to GT size, rounded to 8 bits.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import HeadsUpError, MissingDependencyError

_RESIZE_KINDS = ("up", "down", "keep")


def load_degradation_config(path: str | Path | None = None, **overrides: Any) -> dict:
    """Shipped defaults (Real-ESRGAN's), updated with a user YAML file and then with ``overrides``."""
    import yaml

    cfg = yaml.safe_load(resources.files("headsup_core").joinpath("configs/degradations.yaml").read_text())
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise HeadsUpError(f"Degradation config {p} does not exist; pass an existing YAML file or none.")
        user = yaml.safe_load(p.read_text()) or {}
        unknown = set(user) - set(cfg)
        if unknown:
            raise HeadsUpError(f"Unknown degradation option(s) {sorted(unknown)} in {p}; "
                               "see configs/degradations.yaml.")
        cfg.update(user)
    cfg.update(overrides)
    return cfg


# ---------------------------------------------------------------- random helpers (all from one generator)
def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * torch.rand((), generator=g).item())


def _choice(g: torch.Generator, items, probs=None):
    p = torch.ones(len(items)) if probs is None else torch.tensor(probs, dtype=torch.float64)
    return items[int(torch.multinomial(p, 1, generator=g).item())]


# ---------------------------------------------------------------- kernels (basicsr.data.degradations in torch)
def _grid(k: int) -> torch.Tensor:
    ax = torch.arange(-k // 2 + 1.0, k // 2 + 1.0, dtype=torch.float64)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return torch.stack([xx, yy], dim=-1)  # k x k x 2, (x, y) as basicsr's mesh_grid


def _quad_form(k: int, sig_x: float, sig_y: float, theta: float) -> torch.Tensor:
    c, s = math.cos(theta), math.sin(theta)
    u = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    sigma = u @ torch.diag(torch.tensor([sig_x**2, sig_y**2], dtype=torch.float64)) @ u.T
    inv = torch.linalg.inv(sigma)
    g = _grid(k)
    return torch.einsum("hwi,ij,hwj->hw", g, inv, g)


def gaussian_kernel(k, sig_x, sig_y, theta, beta=None, plateau=False) -> torch.Tensor:
    """Bivariate (generalised / plateau) Gaussian kernel, normalised to sum 1."""
    q = _quad_form(k, sig_x, sig_y, theta)
    if plateau:
        kern = 1.0 / (q.pow(beta) + 1.0)
    elif beta is not None:
        kern = torch.exp(-0.5 * q.pow(beta))
    else:
        kern = torch.exp(-0.5 * q)
    return kern / kern.sum()


def sinc_kernel(cutoff: float, k: int, pad_to: int = 0) -> torch.Tensor:
    """2D circular low-pass (sinc) kernel, basicsr's ``circular_lowpass_kernel``."""
    ax = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    r = torch.sqrt(xx**2 + yy**2)
    kern = cutoff * torch.special.bessel_j1(cutoff * r) / (2 * math.pi * r)
    kern[(k - 1) // 2, (k - 1) // 2] = cutoff**2 / (4 * math.pi)
    kern = kern / kern.sum()
    return _pad_kernel(kern, pad_to) if pad_to > k else kern


def _pad_kernel(kern: torch.Tensor, size: int) -> torch.Tensor:
    p = (size - kern.shape[-1]) // 2
    return F.pad(kern, (p, p, p, p))


def _beta(g, rng) -> float:
    # basicsr: with probability 0.5 beta < 1, else beta > 1
    return _uniform(g, rng[0], 1) if _uniform(g, 0, 1) < 0.5 else _uniform(g, 1, rng[1])


def random_mixed_kernel(g, k, kernel_list, kernel_prob, sigma, betag, betap) -> torch.Tensor:
    kind = _choice(g, kernel_list, kernel_prob)
    iso = kind.endswith("iso") and not kind.endswith("aniso")
    sx = _uniform(g, *sigma)
    sy, theta = (sx, 0.0) if iso else (_uniform(g, *sigma), _uniform(g, -math.pi, math.pi))
    if kind.startswith("generalized"):
        return gaussian_kernel(k, sx, sy, theta, beta=_beta(g, betag))
    if kind.startswith("plateau"):
        return gaussian_kernel(k, sx, sy, theta, beta=_beta(g, betap), plateau=True)
    if kind in ("iso", "aniso"):
        return gaussian_kernel(k, sx, sy, theta)
    raise HeadsUpError(f"Unknown blur kernel type {kind!r} in the degradation config; use one of iso, aniso, "
                       "generalized_iso, generalized_aniso, plateau_iso, plateau_aniso.")


_KERNEL_SIZES = [2 * v + 1 for v in range(3, 11)]  # 7, 9, ..., 21 as in RealESRGANDataset


def sample_blur_kernel(g, cfg: dict, second: bool = False) -> torch.Tensor:
    sfx = "2" if second else ""
    k = _choice(g, _KERNEL_SIZES)
    size = cfg["blur_kernel_size" + sfx]
    if _uniform(g, 0, 1) < cfg["sinc_prob" + sfx]:
        omega = _uniform(g, math.pi / 3, math.pi) if k < 13 else _uniform(g, math.pi / 5, math.pi)
        kern = sinc_kernel(omega, k)
    else:
        kern = random_mixed_kernel(g, k, cfg["kernel_list" + sfx], cfg["kernel_prob" + sfx], cfg["blur_sigma" + sfx],
                                   cfg["betag_range" + sfx], cfg["betap_range" + sfx])
    return _pad_kernel(kern, size)


def sample_final_sinc(g, cfg: dict) -> torch.Tensor:
    size = cfg["blur_kernel_size"]
    if _uniform(g, 0, 1) < cfg["final_sinc_prob"]:
        k = _choice(g, _KERNEL_SIZES)
        return sinc_kernel(_uniform(g, math.pi / 3, math.pi), k, pad_to=size)
    pulse = torch.zeros(size, size, dtype=torch.float64)
    pulse[size // 2, size // 2] = 1.0
    return pulse


# ---------------------------------------------------------------- image ops
def _kornia():
    try:
        import kornia
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingDependencyError("The training degradations need kornia; run `pip install kornia`.") from e
    return kornia


def filter2d(img: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Per-sample 2D filtering with reflect padding (Real-ESRGAN's ``filter2D``).

    Reflect padding needs the image to be larger than half the kernel; tiny intermediate images (small GT crops
    after a strong first downscale) fall back to replicate padding instead of failing.
    """
    border = "reflect" if min(img.shape[-2:]) > kernels.shape[-1] // 2 else "replicate"
    return _kornia().filters.filter2d(img, kernels.to(img), border_type=border)


def add_gaussian_noise(img, g, dg, sigma_range, gray_prob):
    b, _, h, w = img.shape
    sigma = (torch.rand(b, generator=g) * (sigma_range[1] - sigma_range[0]) + sigma_range[0]).to(img)
    gray = (torch.rand(b, generator=g) < gray_prob).to(img).view(b, 1, 1, 1)
    sigma = sigma.view(b, 1, 1, 1) / 255.0
    noise = torch.randn(img.shape, generator=dg, device=img.device, dtype=img.dtype) * sigma
    noise_gray = torch.randn((b, 1, h, w), generator=dg, device=img.device, dtype=img.dtype) * sigma
    noise = noise * (1 - gray) + noise_gray * gray
    return (img + noise).clamp(0, 1)


def _poisson(x, dg):
    x = torch.clamp((x * 255.0).round(), 0, 255) / 255.0
    vals = [2 ** math.ceil(math.log2(len(torch.unique(xi)))) for xi in x]  # distinct levels, as Real-ESRGAN
    vals = x.new_tensor(vals).view(-1, 1, 1, 1)
    return torch.poisson(x * vals, generator=dg) / vals - x


def add_poisson_noise(img, g, dg, scale_range, gray_prob):
    b = img.shape[0]
    scale = (torch.rand(b, generator=g) * (scale_range[1] - scale_range[0]) + scale_range[0]).to(img)
    gray = (torch.rand(b, generator=g) < gray_prob).to(img).view(b, 1, 1, 1)
    noise = _poisson(img, dg)
    gray_img = _kornia().color.rgb_to_grayscale(img)
    noise_gray = _poisson(gray_img, dg).expand_as(img)
    noise = noise * (1 - gray) + noise_gray * gray
    return (img + noise * scale.view(b, 1, 1, 1)).clamp(0, 1)


def jpeg_roundtrip(img: torch.Tensor, quality: int) -> torch.Tensor:
    """One image (1x3xHxW or 3xHxW, 0..1) through a real JPEG encode/decode at ``quality`` (8-bit in and out)."""
    import io

    from PIL import Image

    x = img.reshape(-1, *img.shape[-3:])[0]
    arr = (x.detach().float().clamp(0, 1) * 255.0).round().byte().permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality), subsampling=2)  # 4:2:0 as DiffJPEG
    buf.seek(0)
    with Image.open(buf) as im:
        out = torch.from_numpy(np.asarray(im.convert("RGB")).copy())
    return out.permute(2, 0, 1).to(img.device, img.dtype).div(255.0).reshape(img.shape)


def jpeg(img, g, quality_range):
    """Per image: a quality drawn from ``quality_range`` (Real-ESRGAN draws a float and DiffJPEG rounds)."""
    q = torch.rand(img.shape[0], generator=g) * (quality_range[1] - quality_range[0]) + quality_range[0]
    return torch.cat([jpeg_roundtrip(img[i:i + 1], int(round(float(q[i])))) for i in range(img.shape[0])])


def image_seeds(seed: int | None, batch: int) -> list[int]:
    """The per-image generator seeds used for a batch degraded with ``seed``."""
    g = torch.Generator().manual_seed(0 if seed is None else int(seed))
    return [int(v) for v in torch.randint(0, 2**62, (batch,), generator=g)]


def resize_back(lq: torch.Tensor, size, seed: int | None = None, modes=("area", "bilinear", "bicubic"),
                generator: torch.Generator | None = None) -> torch.Tensor:
    """OSEDiff's resize of the LQ batch back to ``size`` (H, W): a random mode per image, rounded to 8 bits."""
    g = generator if generator is not None else torch.Generator().manual_seed(0 if seed is None else int(seed))
    out = [_interp(lq[i:i + 1].float(), tuple(size), _choice(g, list(modes))) for i in range(lq.shape[0])]
    return (torch.cat(out).clamp(0, 1) * 255.0).round().div(255.0).to(lq.dtype)


class RealESRGANDegradation:
    """``deg(gt, seed) -> lq``: GT in 0..1 (Bx3xHxW, H and W divisible by ``scale``) to LQ (Bx3xH/sxW/s)."""

    def __init__(self, cfg: dict | str | Path | None = None):
        self.cfg = cfg if isinstance(cfg, dict) else load_degradation_config(cfg)

    def sample_kernels(self, g: torch.Generator, batch: int):
        k1 = torch.stack([sample_blur_kernel(g, self.cfg) for _ in range(batch)])
        k2 = torch.stack([sample_blur_kernel(g, self.cfg, second=True) for _ in range(batch)])
        ks = torch.stack([sample_final_sinc(g, self.cfg) for _ in range(batch)])
        return k1, k2, ks

    def _resize(self, img, g, probs, rng, size=None):
        kind = _choice(g, _RESIZE_KINDS, probs)
        scale = {"up": lambda: _uniform(g, 1, rng[1]), "down": lambda: _uniform(g, rng[0], 1),
                 "keep": lambda: 1.0}[kind]()
        mode = _choice(g, self.cfg["resize_modes"])
        if size is not None:
            out_size = (max(1, int(size[0] * scale)), max(1, int(size[1] * scale)))
        else:
            out_size = (max(1, int(img.shape[-2] * scale)), max(1, int(img.shape[-1] * scale)))
        return _interp(img, out_size, mode)

    def _noise(self, img, g, dg, sfx):
        c = self.cfg
        if _uniform(g, 0, 1) < c["gaussian_noise_prob" + sfx]:
            return add_gaussian_noise(img, g, dg, c["noise_range" + sfx], c["gray_noise_prob" + sfx])
        return add_poisson_noise(img, g, dg, c["poisson_scale_range" + sfx], c["gray_noise_prob" + sfx])

    @torch.no_grad()
    def __call__(self, gt: torch.Tensor, seed: int | None = None, return_stages: bool = False):
        """Degrade every image with its own random choices. ``return_stages``: also a dict of stage name -> list
        of per-image tensors (1x3xhxw; sizes differ between images)."""
        s = int(self.cfg["scale"])
        if gt.ndim != 4 or gt.shape[1] != 3:
            raise HeadsUpError(f"Degradation expects a Bx3xHxW image batch, got shape {tuple(gt.shape)}.")
        h, w = gt.shape[-2:]
        if h % s or w % s:
            raise HeadsUpError(f"GT size {h}x{w} is not divisible by the scale {s}; crop it first.")
        outs, stages = [], {}
        for i, si in enumerate(image_seeds(seed, gt.shape[0])):
            lq, st = self.degrade_one(gt[i:i + 1], si)
            outs.append(lq)
            for k, v in st.items():
                stages.setdefault(k, []).append(v)
        lq = torch.cat(outs)
        return (lq, stages) if return_stages else lq

    def degrade_one(self, gt: torch.Tensor, seed: int):
        """One image (1x3xHxW) -> (LQ 1x3x(H/s)x(W/s), {stage: image}), all choices from ``seed``."""
        c = self.cfg
        s = int(c["scale"])
        h, w = gt.shape[-2:]
        g = torch.Generator().manual_seed(int(seed))
        # noise is drawn on the image's device from a generator seeded by the main one
        dg = torch.Generator(device=gt.device).manual_seed(int(torch.randint(0, 2**62, (), generator=g)))
        k1, k2, ks = self.sample_kernels(g, 1)
        stages: dict[str, torch.Tensor] = {}

        def mark(name, x):
            stages[name] = x
            return x

        out = mark("blur1", filter2d(gt.float(), k1))
        out = mark("resize1", self._resize(out, g, c["resize_prob"], c["resize_range"]))
        out = mark("noise1", self._noise(out, g, dg, ""))
        out = mark("jpeg1", jpeg(out, g, c["jpeg_range"]))
        if _uniform(g, 0, 1) < c["second_blur_prob"]:
            out = filter2d(out, k2)
        out = mark("blur2", out)
        out = mark("resize2", self._resize(out, g, c["resize_prob2"], c["resize_range2"], size=(h // s, w // s)))
        out = mark("noise2", self._noise(out, g, dg, "2"))
        if _uniform(g, 0, 1) < 0.5:
            out = _interp(out, (h // s, w // s), _choice(g, c["resize_modes"]))
            out = mark("final_sinc", filter2d(out, ks))
            out = mark("jpeg2", jpeg(out, g, c["jpeg_range2"]))
        else:
            out = mark("jpeg2", jpeg(out, g, c["jpeg_range2"]))
            out = _interp(out, (h // s, w // s), _choice(g, c["resize_modes"]))
            out = mark("final_sinc", filter2d(out, ks))
        lq = torch.clamp((out * 255.0).round(), 0, 255) / 255.0
        return lq.to(gt.dtype), stages


def _interp(img, size, mode):
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    if mode == "area":
        return F.interpolate(img, size=size, mode="area")
    return F.interpolate(img, size=size, mode=mode, align_corners=False)
