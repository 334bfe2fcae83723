"""Differentiable identity networks for training losses and metrics: ``load_identity_network(name)``.

``"dlib"`` is dlib's face-recognition ResNet rebuilt in torch (``dlib_net.py``) from the ``.dat`` that
``pip install face-recognition-models`` installs: public domain, so commercial users can train with it. The file
is parsed once per process; every call returns a fresh module (frozen, eval mode, on the CPU) that the caller may
move to any device.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import FaceError, MissingDependencyError, MissingModelError

log = logging.getLogger(__name__)

NETWORKS = ("dlib",)
DLIB_LICENCE = "dlib_face_recognition_resnet_model_v1: public domain (Davis King); commercial use allowed"
_STATE: dict[str, dict] = {}


def dlib_weights_path(model_root=None) -> Path:
    """``dlib_face_recognition_resnet_model_v1.dat`` in ``model_root``, else in face-recognition-models."""
    from .dlib_backend import RECOGNIZER_FILE, default_model_dir

    folder = Path(model_root).expanduser() if model_root is not None else default_model_dir()
    if folder is None:
        raise MissingDependencyError("The dlib identity network needs its weights: pip install "
                                     "face-recognition-models (or pass model_root=FOLDER with "
                                     f"{RECOGNIZER_FILE}).")
    path = folder / RECOGNIZER_FILE
    if not path.is_file():
        raise MissingModelError(f"dlib face recognition model not found: expected {path} (pip install "
                                "face-recognition-models provides it).")
    return path


def load_identity_network(name: str = "dlib", model_root=None):
    """An ``nn.Module`` mapping Bx3x150x150 float RGB chips in 0..255 (as ``dlib.get_face_chip(img, shape, 150,
    0.25)`` returns them) to Bx128 descriptors, the same vectors dlib's ``compute_face_descriptor`` returns.
    Differentiable and batched; frozen (``requires_grad`` off) and in eval mode."""
    if name != "dlib":
        raise FaceError(f"Unknown identity network {name!r}; available: {', '.join(NETWORKS)}.")
    from .dlib_net import DlibFaceNet

    path = dlib_weights_path(model_root)
    key = str(path.resolve())
    net = DlibFaceNet()
    if key not in _STATE:
        _STATE[key] = net.load_dat(path).state_dict()
        log.info("dlib identity network (torch) read from %s. Licence: %s.", path, DLIB_LICENCE)
    else:
        net.load_state_dict(_STATE[key])
    return net.eval().requires_grad_(False)


def chip_template(size: int = 150, padding: float = 0.25):
    """Our 5 landmarks (eyes, nose tip, mouth corners) on the chip ``dlib.get_face_chip(img, shape, size,
    padding)`` makes: dlib's 5-point template put through the same conversion as detected dlib points."""
    from .dlib_backend import dlib_to_kps
    from .dlib_net import chip_points

    return dlib_to_kps(chip_points(size, padding))


class IdentityEmbedder:
    """Identity descriptors of faces given by their 5 landmarks, with a torch identity network, batched: the
    faces are warped onto dlib's 150x150 chip (a similarity fit of the landmarks to ``chip_template``) and run
    through the network together. Used by eval's ID similarity and the dataset builder. ``name`` says which
    network ran (and its licence), ``kind`` is its identity scale (``faces.identity``)."""

    def __init__(self, network: str = "dlib", device=None, model_root=None, batch_size: int = 32):
        import torch

        self.device = torch.device(device or "cpu")
        self.net = load_identity_network(network, model_root).to(self.device)
        self.kind = self.net.identity_kind
        self.name = f"dlib ResNet face descriptor (torch port; {DLIB_LICENCE})"
        self.size, self.batch_size = self.net.input_size, int(batch_size)
        self._template = chip_template(self.size)

    def chips(self, image, kps_list):
        """HxWx3 uint8 RGB + N landmark sets -> Nx150x150x3 uint8 chips (zero outside the image, as dlib)."""
        import numpy as np

        from .align import cv2_module, estimate_similarity

        cv2 = cv2_module()
        # eyes and nose only: dlib's mouth corners are derived, and fitting them costs identity (t1: native
        # cosine to dlib's own descriptor 0.996-0.999 this way, 0.977-0.998 with all five points)
        out = [cv2.warpAffine(np.ascontiguousarray(image), estimate_similarity(np.asarray(k, np.float64)[:3],
                              self._template[:3]), (self.size, self.size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT) for k in kps_list]
        return np.stack(out) if out else np.zeros((0, self.size, self.size, 3), np.uint8)

    def embed_many(self, image, kps_list):
        """Nx128 L2-normalised float32 descriptors of the faces at ``kps_list`` in ``image``."""
        import numpy as np
        import torch

        chips = self.chips(image, kps_list)
        outs = []
        with torch.no_grad():
            for i in range(0, len(chips), self.batch_size):
                x = torch.from_numpy(chips[i:i + self.batch_size]).to(self.device).permute(0, 3, 1, 2).float()
                outs.append(torch.nn.functional.normalize(self.net(x), dim=1).cpu().numpy())
        return np.concatenate(outs).astype(np.float32) if outs else np.zeros((0, 128), np.float32)

    def embed(self, image, kps):
        """One face's descriptor (the ``FaceAnalyzer.embed`` signature)."""
        return self.embed_many(image, [kps])[0]


def default_embedder(choice: str = "auto", device=None):
    """``auto``/``dlib``: the torch dlib network (``auto`` gives None when face-recognition-models is missing);
    ``analyzer``: None, i.e. the face analyzer's own recognizer."""
    if choice == "analyzer":
        return None
    if choice not in ("auto", "dlib"):
        raise FaceError(f"Unknown identity network {choice!r}; use auto, dlib or analyzer.")
    try:
        return IdentityEmbedder("dlib", device=device)
    except (MissingDependencyError, MissingModelError):
        if choice == "dlib":
            raise
        log.warning("No dlib identity weights (pip install face-recognition-models); identity uses the face "
                    "analyzer's own recognizer.")
        return None
