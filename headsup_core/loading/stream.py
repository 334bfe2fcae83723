"""Reading single files tensor by tensor: the header first, then only the tensors a model needs, each cast to its
target dtype as it is read.

A whole-file read would hold every tensor of the file at once (an SD2.1 single file carries its text encoder,
sometimes EMA copies too) plus a converted copy of each. Here the file is memory-mapped by safetensors (or by
``torch.load(mmap=True, weights_only=True)`` for zip-format ``.ckpt``), a tensor is copied out in its target
dtype and memory format, and the mapping is closed every ``CHUNK_BYTES`` of source data, so the file's pages do
not stay in the process's resident memory next to the copies. Peak memory while loading is the loaded weights in
their target dtypes plus one chunk.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

import torch

from .finite import check_finite
from .weight_files import SAFETENSORS_ERRORS, corrupt_safetensors, torch_load_safely

CHUNK_BYTES = 512 << 20  # source bytes read per opening of the memory map
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", torch.uint8),
              "F8_E5M2": getattr(torch, "float8_e5m2", torch.uint8)}

# dtype a tensor should be read in, from its key and its stored dtype (None: keep the stored dtype)
DtypeRule = Callable[[str, torch.dtype], "torch.dtype | None"]


class SingleFile:
    """A weights file opened for reading by key. ``header`` maps every key to a meta tensor with the stored shape
    and dtype (for identification and shape checks, no data read); ``read`` copies tensors out."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.safetensors = self.path.endswith(".safetensors")
        self.metadata: dict[str, str] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        if self.safetensors:
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(self.path, framework="pt", device="cpu") as f:
                    self.metadata = dict(f.metadata() or {})
                    self.header = {}
                    for key in f.keys():
                        sl = f.get_slice(key)
                        self.header[key] = torch.empty(sl.get_shape(), dtype=_ST_DTYPES.get(sl.get_dtype(),
                                                                                             torch.uint8),
                                                       device="meta")
            except (SafetensorError, *SAFETENSORS_ERRORS) as err:
                raise corrupt_safetensors(self.path, err) from None
        else:
            self._pickled = torch_load_safely(self.path)
            self.header = {k: v for k, v in self._pickled.items() if isinstance(v, torch.Tensor)}

    def keys_with_prefix(self, *prefixes: str) -> list[str]:
        return [k for k in self.header if k.startswith(prefixes)]

    def read(self, keys: Iterable[str], dtype_rule: DtypeRule | None = None,
             strip_prefix: str = "") -> dict[str, torch.Tensor]:
        """The tensors ``keys`` as new tensors (never views of the file), each in ``dtype_rule(key, dtype)``
        (floating tensors only; None keeps the stored dtype). ``strip_prefix`` is removed from the returned keys."""
        keys = list(keys)
        out: dict[str, torch.Tensor] = {}

        def take(key: str, t: torch.Tensor) -> None:
            check_finite(key, t, self.path)
            want = dtype_rule(key, t.dtype) if (dtype_rule and t.is_floating_point()) else None
            name = key[len(strip_prefix):] if strip_prefix and key.startswith(strip_prefix) else key
            out[name] = t.to(dtype=want or t.dtype, copy=True)

        if not self.safetensors:
            for key in keys:
                take(key, self._pickled[key])
            return out
        from safetensors import SafetensorError, safe_open

        start = 0
        try:
            while start < len(keys):
                done = 0
                with safe_open(self.path, framework="pt", device="cpu") as f:
                    while start < len(keys) and (done == 0 or done < CHUNK_BYTES):
                        t = f.get_tensor(keys[start])
                        done += t.numel() * t.element_size()
                        take(keys[start], t)
                        del t
                        start += 1
        except (SafetensorError, *SAFETENSORS_ERRORS) as err:
            raise corrupt_safetensors(self.path, err) from None
        return out

    def close(self) -> None:
        self._pickled = None
