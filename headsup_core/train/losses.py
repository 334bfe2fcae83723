"""Training losses: whole-image MSE + LPIPS, and face supervision on GT face crops.

Face losses only ever see pixels inside the GT face boxes: crops are taken with ``torchvision.ops.roi_align``
(differentiable, one crop per face, no full-image copies) and identity crops with a 5-point similarity warp
(kornia ``warp_affine``) onto the ArcFace 112x112 template. The VSD term lives in ``vsd.py``.
Every weight is a config value (see ``configs/train_*.yaml``); defaults follow the HeadsUp paper (face MSE 1,
face LPIPS 0.8, identity 4) and OSEDiff (MSE 1, LPIPS 2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import MissingDependencyError, MissingModelError, WeightsError

# insightface's 112x112 ArcFace template (left eye, right eye, nose, mouth left, mouth right)
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)

# torchvision's file names for the LPIPS backbones (what torch.hub would cache)
_TV_WEIGHTS = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth", "squeeze": "squeezenet1_1-b8a52dc0.pth"}


def _require(name: str, pip: str):
    import importlib
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise MissingDependencyError(f"Training losses need {pip}; run `pip install {pip}`.") from e


class LPIPSLoss(nn.Module):
    """LPIPS from the ``lpips`` package, with the backbone weights read from a file (never downloaded).

    ``backbone_weights``: torchvision's vgg16/alexnet ``.pth``; if None, torch.hub's cache is looked up.
    ``random=True`` builds random backbone + positive random linear heads (tests and toy runs only).
    Inputs are in [-1, 1], as lpips expects.
    """

    def __init__(self, net: str = "vgg", backbone_weights: str | Path | None = None, random: bool = False):
        super().__init__()
        lpips = _require("lpips", "lpips")
        if not random:
            path = Path(backbone_weights) if backbone_weights else \
                Path(torch.hub.get_dir()) / "checkpoints" / _TV_WEIGHTS[net]
            if not path.is_file():
                raise MissingModelError(
                    f"LPIPS needs the torchvision {net} weights at {path}; download {_TV_WEIGHTS[net]} there "
                    "or set losses.lpips_backbone in the training config.")
        import warnings

        with torch.random.fork_rng(), warnings.catch_warnings():
            # lpips builds its backbone with torchvision's deprecated pretrained= argument; the backbone weights
            # are loaded below from a local file, so torchvision's deprecation notice is only noise here.
            warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
            torch.manual_seed(0)  # a random (test) LPIPS is the same network in every run and seed
            self.net = lpips.LPIPS(net=net, pretrained=not random, pnet_rand=True, verbose=False)
        if random:
            with torch.no_grad():
                for p in self.net.lins.parameters():
                    p.abs_()  # keeps the distance non-negative and monotone in feature differences
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            for sl in [m for n, m in self.net.net.named_children() if n.startswith("slice")]:
                for name, p in sl.named_parameters():
                    key = f"features.{name}"
                    if key not in sd:
                        raise WeightsError(f"{path} is not a torchvision {net} checkpoint (no {key}).")
                    p.data.copy_(sd[key])
        self.net.eval().requires_grad_(False)

    def train(self, mode: bool = True):  # stays in eval mode (dropout off) whatever the trainer does
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(x.float(), y.float()).mean()


def tiny_arcface(num_units=(1, 1, 1, 1), widths=(16, 16, 32, 32), emb: int = 64) -> nn.Module:
    """A small random network built from facexlib's IR-SE blocks (tests / toy runs only)."""
    arch = _require("facexlib.recognition.arcface_arch", "facexlib")
    layers = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.PReLU(widths[0])]
    cin = widths[0]
    for n, w in zip(num_units, widths):
        for i in range(n):
            layers.append(arch.bottleneck_IR_SE(cin, w, 2 if i == 0 else 1))
            cin = w
    return nn.Sequential(*layers, nn.BatchNorm2d(cin), arch.Flatten(), nn.Linear(cin * 7 * 7, emb),
                         nn.BatchNorm1d(emb))


class ArcFaceIdentity(nn.Module):
    """Frozen ArcFace IR-SE50 (facexlib's architecture, ``recognition_arcface_ir_se50.pth``), differentiable.

    Input: aligned 112x112 RGB crops in [-1, 1]. Output: L2-normalised embeddings.
    """

    crop_size = 112
    name = "facexlib ArcFace IR-SE50 (recognition_arcface_ir_se50.pth)"

    def __init__(self, weights: str | Path | None = None, tiny: bool = False, seed: int = 0):
        super().__init__()
        if tiny:
            self.name = "tiny random ArcFace (tests and toy runs only)"
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                self.net = tiny_arcface()
        else:
            arch = _require("facexlib.recognition.arcface_arch", "facexlib")
            if weights is None or not Path(weights).is_file():
                raise MissingModelError(
                    f"The identity loss needs facexlib's recognition_arcface_ir_se50.pth at {weights}; "
                    "download it there or set losses.arcface_weights in the training config.")
            self.net = arch.Backbone(num_layers=50, drop_ratio=0.6, mode="ir_se")
            sd = torch.load(weights, map_location="cpu", weights_only=True)
            try:
                self.net.load_state_dict(sd, strict=True)
            except RuntimeError as e:
                raise WeightsError(f"{weights} is not an IR-SE50 ArcFace checkpoint: {e}") from e
        self.net.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x.float()), dim=1)


class DlibIdentity(nn.Module):
    """Frozen dlib face-recognition ResNet in torch (``faces.load_identity_network("dlib")``), differentiable;
    public domain weights from ``face-recognition-models``. Input: 150x150 RGB chips in [-1, 1] on dlib's chip
    (``align_from_arcface`` maps ArcFace-template alignments onto it). Output: L2-normalised descriptors.

    dlib's cosines are squeezed near 1 (strangers ~0.8-0.9, see faces/identity.py), so ``1 - cos`` spans about a
    fifth of ArcFace's range at the same weight."""

    crop_size = 150
    name = "dlib_face_recognition_resnet_model_v1 (torch port; public domain)"

    def __init__(self, model_root=None):
        super().__init__()
        from ..faces.align import estimate_similarity
        from ..faces.identity_net import chip_template, load_identity_network

        self.net = load_identity_network("dlib", model_root)
        # ArcFace 112 template -> dlib chip, fitted on eyes and nose (the points dlib measures)
        m = estimate_similarity(ARCFACE_TEMPLATE[:3], chip_template(self.crop_size)[:3])
        self.register_buffer("from_arcface", torch.tensor(np.vstack([m, [0, 0, 1]]), dtype=torch.float32),
                             persistent=False)

    def train(self, mode: bool = True):
        return super().train(False)

    def align_from_arcface(self, mats: torch.Tensor) -> torch.Tensor:
        """Nx2x3 image -> ArcFace-112 matrices -> Nx2x3 image -> dlib-chip matrices."""
        full = torch.cat([mats.float(), mats.new_tensor([0.0, 0.0, 1.0]).float().expand(mats.shape[0], 1, 3)], 1)
        return (self.from_arcface.to(mats.device) @ full)[:, :2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net((x.float() + 1) * 127.5), dim=1)


def load_identity_loss_net(choice: str = "auto", arcface_weights=None, tiny: bool = False) -> nn.Module:
    """The identity network of the face-identity loss: ``auto`` takes facexlib's ArcFace IR-SE50 when its
    weights file is present, else dlib's ResNet (public domain); ``tiny``: a small random ArcFace (tests)."""
    if tiny:
        return ArcFaceIdentity(tiny=True)
    if choice not in ("auto", "arcface", "dlib"):
        raise ValueError(f"losses.identity_net must be auto, arcface or dlib, not {choice!r}.")
    if choice == "arcface" or (choice == "auto" and arcface_weights and Path(arcface_weights).is_file()):
        return ArcFaceIdentity(arcface_weights)
    return DlibIdentity()


class PatchDiscriminator(nn.Module):
    """pix2pix-style PatchGAN (n_layers conv blocks) with spectral norm, for face crops."""

    def __init__(self, channels: int = 32, n_layers: int = 3):
        super().__init__()
        sn = nn.utils.spectral_norm
        layers, c = [sn(nn.Conv2d(3, channels, 4, 2, 1)), nn.LeakyReLU(0.2, True)], channels
        for i in range(1, n_layers):
            layers += [sn(nn.Conv2d(c, c * 2, 4, 2, 1)), nn.LeakyReLU(0.2, True)]
            c *= 2
        layers += [sn(nn.Conv2d(c, c, 4, 1, 1)), nn.LeakyReLU(0.2, True), sn(nn.Conv2d(c, 1, 4, 1, 1))]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def face_align_matrix(kps: np.ndarray, size: int = 112) -> np.ndarray:
    """2x3 similarity transform (least squares, OpenCV) from image landmarks to the ArcFace template."""
    cv2 = _require("cv2", "opencv-python-headless")
    dst = ARCFACE_TEMPLATE * (size / 112.0)
    m, _ = cv2.estimateAffinePartial2D(np.asarray(kps, np.float32), dst, method=cv2.LMEDS)
    if m is None:  # degenerate landmarks: fall back to plain least squares
        m, _ = cv2.estimateAffinePartial2D(np.asarray(kps, np.float32), dst, method=0)
    return m.astype(np.float32)


def crop_faces(img: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """``boxes``: Nx5 (batch index, x1, y1, x2, y2) in pixels -> Nx3xsize x size crops (differentiable)."""
    from torchvision.ops import roi_align

    return roi_align(img.float(), boxes.float(), output_size=(size, size), spatial_scale=1.0,
                     sampling_ratio=-1, aligned=True)


def align_faces(img: torch.Tensor, batch_idx: torch.Tensor, mats: torch.Tensor, size: int = 112):
    """Warp each face (image ``batch_idx[i]``, 2x3 matrix ``mats[i]``) to a size x size aligned crop."""
    kornia = _require("kornia", "kornia")
    return kornia.geometry.transform.warp_affine(img.float()[batch_idx.long()], mats.float().to(img.device),
                                                 (size, size), mode="bilinear", padding_mode="reflection",
                                                 align_corners=False)


class FaceLosses(nn.Module):
    """Face MSE, face LPIPS, identity and adversarial losses on GT face regions.

    ``sr``/``gt``: Bx3xHxW in [-1, 1]. ``faces``: dict with ``boxes`` Nx5 (batch index, x1, y1, x2, y2) and
    ``align`` Nx2x3 (image -> 112 ArcFace template). Returns ({name: weighted loss}, face crops for the D step).
    """

    def __init__(self, lpips_loss: LPIPSLoss | None, arcface: ArcFaceIdentity | None,
                 discriminator: PatchDiscriminator | None, w_mse=1.0, w_lpips=0.8, w_id=4.0, w_adv=0.1,
                 crop_size: int = 128):
        super().__init__()
        self.lpips, self.arcface, self.disc = lpips_loss, arcface, discriminator
        self.w = dict(face_mse=w_mse, face_lpips=w_lpips, face_id=w_id, face_adv=w_adv)
        self.crop_size = crop_size

    def forward(self, sr: torch.Tensor, gt: torch.Tensor, faces: dict | None):
        if faces is None or faces["boxes"].numel() == 0:
            zero = sr.sum() * 0.0  # keeps the graph (and DDP) happy when a batch has no face
            return {k: zero for k, w in self.w.items() if w}, None
        boxes = faces["boxes"].to(sr.device)
        sr_c, gt_c = crop_faces(sr, boxes, self.crop_size), crop_faces(gt, boxes, self.crop_size)
        out = {}
        if self.w["face_mse"]:
            out["face_mse"] = F.mse_loss(sr_c, gt_c) * self.w["face_mse"]
        if self.w["face_lpips"] and self.lpips is not None:
            out["face_lpips"] = self.lpips(sr_c, gt_c) * self.w["face_lpips"]
        if self.w["face_id"] and self.arcface is not None:
            idx, mats = boxes[:, 0], faces["align"]
            size = getattr(self.arcface, "crop_size", 112)
            if hasattr(self.arcface, "align_from_arcface"):  # a network with its own chip (dlib)
                mats = self.arcface.align_from_arcface(mats.to(sr.device))
            e_sr = self.arcface(align_faces(sr, idx, mats, size))
            with torch.no_grad():
                e_gt = self.arcface(align_faces(gt, idx, mats, size))
            out["face_id"] = (1.0 - (e_sr * e_gt).sum(dim=1)).mean() * self.w["face_id"]
        if self.w["face_adv"] and self.disc is not None:
            self.disc.requires_grad_(False)  # the generator step must not update D
            out["face_adv"] = F.softplus(-self.disc(sr_c)).mean() * self.w["face_adv"]
            self.disc.requires_grad_(True)
        return out, (sr_c.detach(), gt_c.detach())


def discriminator_loss(disc: PatchDiscriminator, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Non-saturating logistic GAN loss for the face discriminator (one forward, so DDP sees a single call)."""
    logits = disc(torch.cat([fake, real]))
    lf, lr = logits.split([fake.shape[0], real.shape[0]])
    return F.softplus(lf).mean() + F.softplus(-lr).mean()


def image_losses(sr: torch.Tensor, gt: torch.Tensor, lpips_loss: LPIPSLoss | None, w_mse=1.0, w_lpips=2.0):
    """Whole-image MSE + LPIPS as OSEDiff (float32, inputs in [-1, 1])."""
    out = {"mse": F.mse_loss(sr.float(), gt.float()) * w_mse}
    if lpips_loss is not None and w_lpips:
        out["lpips"] = lpips_loss(sr, gt) * w_lpips
    return out
