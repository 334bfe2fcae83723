"""Weight files read safely: safetensors, or ``torch.load(weights_only=True)`` for ``.ckpt``/``.pt``/``.pkl``.

Every reader of weights goes through here (base loading, the streaming single-file reader, HeadsUp and OSEDiff
weights, the tagger), so a missing, empty, corrupt, pickled-code or NaN-carrying file is refused with the same
sentence wherever it is opened.
"""
from __future__ import annotations

import os

import torch

from ..errors import MissingModelError, WeightsError
from .finite import check_all_finite

SAFETENSORS_ERRORS = (OSError, ValueError, RuntimeError)  # plus safetensors' own SafetensorError


def check_present(path: str) -> None:
    """A clear sentence for a weights file that is missing or empty (an interrupted download leaves 0 bytes)."""
    if not os.path.exists(path):
        raise MissingModelError(f"Weights file not found: {path}")
    if os.path.getsize(path) == 0:
        raise WeightsError(f"The weights file {path} is empty (0 bytes); download or copy it again.")


def corrupt_safetensors(path: str, err: BaseException) -> WeightsError:
    return WeightsError(f"The safetensors file {path} is corrupt or truncated ({err}); download or copy it again.")


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a weights file safely. Returns (tensors, safetensors metadata). Raises WeightsError when unsafe/corrupt."""
    path = os.fspath(path)
    check_present(path)
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        try:
            tensors, meta = {}, {}
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, *SAFETENSORS_ERRORS) as err:
            raise corrupt_safetensors(path, err) from None
        check_all_finite(tensors, path)
        return tensors, meta
    state = torch_load_safely(path)
    check_all_finite(state, path)
    return state, {}


def torch_load_safely(path: str) -> dict:
    """A pickled checkpoint through ``torch.load(weights_only=True)``: tensors and plain containers only."""
    import pickle

    try:
        try:  # zip-format checkpoints are memory-mapped (tensors are read when used); legacy ones are read whole
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err) and "zip" not in str(err):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsError(
            f"Refusing to load {path}: it is a pickle that contains code or objects other than tensors ({err}). "
            "Only plain tensor checkpoints are loaded; convert it to .safetensors with a trusted tool."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError) as err:
        raise WeightsError(f"Cannot read {path}: the file is corrupt or not a torch checkpoint ({err}).") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} does not contain a dictionary of tensors (found {type(obj).__name__}).")
    return obj
