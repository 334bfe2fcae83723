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
