"""Weights with NaN or infinite values are refused at load, naming the tensor (a damaged file or a diverged run
would otherwise give black or noise outputs with no hint why)."""
from __future__ import annotations

import torch

from ..errors import WeightsError


def check_finite(key: str, tensor: torch.Tensor, path: str) -> None:
    if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise WeightsError(f"The weights file {path} has {bad} NaN or infinite value(s) in tensor {key}; the file is "
                           "damaged or came from a diverged training run, so use another copy.")


def check_all_finite(tensors: dict, path: str, prefix: str = "") -> None:
    """Every floating tensor of a (nested, as in OSEDiff's .pkl) dictionary."""
    for key, value in tensors.items():
        if isinstance(value, torch.Tensor):
            check_finite(prefix + str(key), value, path)
        elif isinstance(value, dict):
            check_all_finite(value, path, f"{prefix}{key}.")
