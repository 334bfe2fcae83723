"""The weight files of a diffusers model folder's component (``unet/``, ``vae/``), read like single files.

``from_pretrained`` reads a whole component in its stored dtype and casts it afterwards, so a folder of fp32
weights loaded into fp16 peaks at both copies (about 1.5 GB more than a single file for the SD2.1 UNet). Here each
component's files are opened with ``stream.SingleFile`` and every tensor is copied out straight into its stage's
dtype, a chunk at a time. Layouts found in the wild, in the order they are preferred:

* ``diffusion_pytorch_model.safetensors`` (one file);
* ``diffusion_pytorch_model.safetensors.index.json`` with its shards;
* ``diffusion_pytorch_model.fp16.safetensors`` (the fp16 variant alone, as some repositories ship it);
* ``diffusion_pytorch_model.bin`` (pickled; read with ``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import json
import os

import torch

from ..errors import WeightsError
from .stream import DtypeRule, SingleFile

WEIGHT_NAME = "diffusion_pytorch_model"


def component_files(folder: str | os.PathLike, sub: str) -> list[str]:
    """The weight files of ``folder/sub``, in the first layout found (see the module docstring); [] when none."""
    root = os.path.join(os.fspath(folder), sub)
    single = os.path.join(root, f"{WEIGHT_NAME}.safetensors")
    if os.path.isfile(single):
        return [single]
    index = os.path.join(root, f"{WEIGHT_NAME}.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as err:
            raise WeightsError(f"{index} is not a readable shard index ({err}); re-download the model folder.") from None
        files = [os.path.join(root, s) for s in shards]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise WeightsError(f"{index} names shards that are missing, e.g. {missing[0]}; re-download the folder.")
        return files
    for name in (f"{WEIGHT_NAME}.fp16.safetensors", f"{WEIGHT_NAME}.bin"):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return [path]
    return []


def read_component(files: list[str], dtype_rule: DtypeRule | None = None,
                   keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a component's ``files`` (all, or only ``keys``), each read straight into
    ``dtype_rule(key, stored dtype)``."""
    out: dict[str, torch.Tensor] = {}
    for path in files:
        src = SingleFile(path)
        wanted = [k for k in src.header if keys is None or k in keys]
        out.update(src.read(wanted, dtype_rule))
        src.close()
    return out


def component_header(files: list[str]) -> dict[str, torch.Tensor]:
    """Every tensor's name, shape and stored dtype (meta tensors), from the files' headers alone."""
    header: dict[str, torch.Tensor] = {}
    for path in files:
        header.update(SingleFile(path).header)
    return header
