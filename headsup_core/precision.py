"""Precision: the one place that decides which dtype each stage computes in, keeps its weights in, and when a
stage is retried in fp32. Every front end asks here (CLI/library ``pick_dtype``, ComfyUI ``host_dtype``, A1111
``host_dtype``); loading/dtypes.py only applies what is decided here.

* **Compute, GPU:** fp16 (``auto``). Not bf16: the one-step update multiplies the error in the UNet's eps by
  sqrt(1-a)/sqrt(a) = 14.6 at t=999, and bf16's 8-bit mantissa costs far more than fp16's 11 bits
  (docs/benchmark.md, "Precision"); OSEDiff runs in fp16.
* **Compute, CPU:** fp32, except the VAE decoder in bf16 on CPUs with native bf16 (AVX512-BF16 or AMX, read
  from the CPU flags, never assumed). Not the encoder and not the UNet: the x0 update divides the encoded latent
  by sqrt(a) and multiplies eps by sqrt(1-a)/sqrt(a) (14.6 at t=999), so their errors are amplified alike. The rule
  is "worst case >= 40 dB PSNR from fp32 on two independent weight sets" (bench/precision.py: the seed-0 LDM
  single file and a seed-1 diffusers folder with OSEDiff-format LoRA; figures in docs/benchmark.md, "Precision"):
  at 512² the bf16 decoder gives 46.4 / 49.7 dB (file / folder), the encoder 41.9 / 39.1, the whole VAE 40.7 /
  38.8, the UNet 38.4 / 39.3 (28 dB at 1024² earlier): only the decoder passes on both.
  ``HEADSUP_CPU_BF16`` overrides the bf16 stages: a comma list of ``encoder``, ``decoder``, ``unet``, or ``none``.
* **Storage:** the compute dtype, unless memory is short: on a CPU, when the fp32 weights would take more than
  ``STORAGE_SHARE`` of the memory budget, the UNet keeps its weights in fp16 and each layer is cast up for its
  own forward. ``weight_dtype`` chooses it outright. The VAE always stores what it computes in.
* **Retry:** a stage computing in 16 bits whose output has NaN/Inf is run again in fp32 (``retry_in_fp32``).
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Iterable

import torch

from . import memory
from .choices import WEIGHT_DTYPE_CHOICES
from .errors import HeadsUpError

log = logging.getLogger("headsup")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = ("auto", "fp16", "bf16", "fp32")  # what front ends (ComfyUI widget, CLI) offer
ENV_BF16 = "HEADSUP_CPU_BF16"
CPU_BF16_STAGES = ("decoder",)  # not the encoder: the x0 update amplifies its error like the UNet's
STAGE_NAMES = ("encoder", "decoder", "unet")
STAGES = ("unet", "encoder", "decoder")
NARROW_STAGES = ("unet",)  # the stages whose weights may be stored narrower than they compute
STORAGE_SHARE = 0.5  # fp32 weights above this share of the memory budget -> 16-bit storage (auto)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------- compute
def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/"auto": fp32 on CPU, fp16 on GPUs (see the module docstring); else the named dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.float16
    if dtype not in DTYPES:
        raise HeadsUpError(f"Unknown dtype {dtype!r}; use auto, fp32, fp16 or bf16.")
    return DTYPES[dtype]


def host_dtype(choice: str | None, device: torch.device, *, fp16_ok: bool = True, bf16_ok: bool = False,
               no_half: bool = False) -> torch.dtype | None:
    """The compute dtype of a pipeline a host runs (ComfyUI's HeadsUpLoader widget, A1111/Forge): a named
    ``choice`` as it is; on a CPU, ``None`` (the per-stage CPU policy of ``compute_dtypes``); with ``no_half``,
    fp32; on a GPU fp16 where the host says the device has it (the same as the library's ``auto``), bf16 only
    where fp16 is missing, else fp32. Never bf16 first: see the module docstring."""
    if choice not in (None, "auto"):
        return pick_dtype(choice, device)
    if torch.device(device).type == "cpu":
        return None
    if no_half:
        return torch.float32
    if fp16_ok:
        return torch.float16
    if bf16_ok:
        return torch.bfloat16
    return torch.float32


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_native_bf16(flags: set[str] | None = None) -> bool:
    """AVX512-BF16 or AMX-BF16 in the CPU flags (Linux). Elsewhere unknown, so False: never assumed."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def cpu_bf16_stages(native: bool | None = None) -> tuple[str, ...]:
    env = os.environ.get(ENV_BF16)
    if env is not None:
        stages = tuple(s.strip() for s in env.lower().split(",") if s.strip() and s.strip() != "none")
        unknown = [s for s in stages if s not in STAGE_NAMES]
        if unknown:
            log.warning("HeadsUp: ignoring unknown stage(s) %s in %s (use encoder, decoder, unet or none).",
                        unknown, ENV_BF16)
        return tuple(s for s in stages if s in STAGE_NAMES)
    return CPU_BF16_STAGES if (cpu_native_bf16() if native is None else native) else ()


def compute_dtypes(device: torch.device, dtype_requested=None) -> dict[str, torch.dtype]:
    """The dtype each stage computes in: ``dtype_requested`` for every stage when named, else the device dtype
    with the measured CPU exceptions (bf16 stages)."""
    dt = pick_dtype(dtype_requested, device)
    out = {s: dt for s in STAGES}
    if torch.device(device).type == "cpu" and dtype_requested in (None, "auto"):
        for stage in cpu_bf16_stages():
            out[stage] = torch.bfloat16
    return out


# ----------------------------------------------------------------------------------------------- storage
def storage_dtypes(device: torch.device, compute: dict[str, torch.dtype], weight_dtype: str | None = "auto",
                   fp32_weight_bytes: int = 0, budget: int | None = None) -> dict[str, torch.dtype]:
    """The dtype each stage's weights are kept in. Storage is never wider than compute."""
    weight_dtype = (weight_dtype or "auto").lower()
    if weight_dtype not in WEIGHT_DTYPE_CHOICES:
        raise HeadsUpError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPE_CHOICES)}, got {weight_dtype!r}.")
    narrow = None
    if weight_dtype != "auto":
        narrow = DTYPES[weight_dtype]
    elif torch.device(device).type == "cpu" and fp32_weight_bytes:
        budget = memory.budget_bytes(device) if budget is None else budget
        if fp32_weight_bytes > STORAGE_SHARE * budget:
            narrow = torch.float16
            log.info("HeadsUp: keeping fp32 stages' weights in fp16 (%.1f GB of fp32 weights > %.0f%% of the "
                     "%.1f GB memory budget); each layer is cast to fp32 for its forward.",
                     fp32_weight_bytes / 1e9, 100 * STORAGE_SHARE, budget / 1e9)
    out = {}
    for stage, c in compute.items():
        narrower = narrow is not None and torch.finfo(narrow).bits < torch.finfo(c).bits
        out[stage] = narrow if narrower and stage in NARROW_STAGES else c
    return out


# ----------------------------------------------------------------------------------------------- fp32 retry
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


def retry_in_fp32(fn: Callable, stage: str, compute: torch.dtype, modules: Iterable[torch.nn.Module],
                  what: str = "this tile") -> Callable:
    """``fn`` such that, when ``stage`` computes in 16 bits (``compute``, not the weights' storage dtype) and its
    output has NaN/Inf, it runs again with ``modules`` upcast to fp32, with a warning (``what`` was retried: a
    tile, or "it", the whole stage)."""
    if compute == torch.float32:
        return fn
    group = torch.nn.ModuleList(modules)

    def run(*args):
        out = fn(*args)
        if not torch.isfinite(out).all():
            log.warning("HeadsUp: NaN/Inf in the %s stage in %s; retrying %s in fp32.", stage, compute, what)
            with upcast(group):
                out = fn(*args)
        return out
    return run
