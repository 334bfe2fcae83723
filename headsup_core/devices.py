"""Device and dtype choice, and memory figures, without hard-coded ``torch.cuda`` calls elsewhere."""
from __future__ import annotations

import contextlib
import logging

import torch

from .errors import HeadsUpError

log = logging.getLogger("headsup")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = ("auto", "fp16", "bf16", "fp32")  # what front ends (ComfyUI widget, CLI) offer


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"auto" picks cuda (also ROCm), then mps, then cpu. An unavailable explicit choice is an error."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HeadsUpError(f"Device {device!r} was asked for but no CUDA/ROCm GPU is available; use --device cpu.")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise HeadsUpError(f"Device {device!r} was asked for but MPS is not available; use --device cpu.")
    return dev


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/"auto": fp32 on CPU, fp16 on GPUs.

    Not bf16: the one-step update multiplies the error in the UNet's eps by sqrt(1-a)/sqrt(a) = 14.6 at t=999, and
    bf16's 8-bit mantissa costs far more than fp16's 11 bits (docs/benchmark.md, "Precision"); OSEDiff runs in
    fp16. NaN/Inf in a half-precision stage is retried in fp32 by the pipeline.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return torch.float16
    if dtype not in DTYPES:
        raise HeadsUpError(f"Unknown dtype {dtype!r}; use auto, fp32, fp16 or bf16.")
    return DTYPES[dtype]


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated bytes on a GPU since the last reset, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):  # pragma: no cover - non-POSIX
        return 0


def total_memory_bytes(device: torch.device) -> int:
    """Total memory of a GPU (0 when unknown, e.g. on CPU)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device).total_memory)
    return 0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


@contextlib.contextmanager
def upcast(module: torch.nn.Module):
    """Temporarily run ``module`` in fp32 (the NaN/Inf retry for half-precision stages). Every parameter gets its
    own dtype back afterwards (stages may mix dtypes: 16-bit stored weights next to fp32 norms)."""
    params = list(module.parameters())
    if all(p.dtype == torch.float32 for p in params):
        yield
        return
    dtypes = [p.dtype for p in params]
    module.float()
    try:
        yield
    finally:
        for p, dt in zip(params, dtypes):
            if p.dtype != dt:
                p.data = p.data.to(dt)


OOM_ERRORS: tuple[type[BaseException], ...] = (torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else (RuntimeError,)


def version_counter(t: torch.Tensor) -> int:
    """A tensor's in-place edit counter, for caches keyed on it. Inference tensors (a model or image made under
    ``torch.inference_mode``, as ComfyUI runs nodes) keep none: -1, and the caller's other keys must suffice."""
    return -1 if t.is_inference() else t._version
