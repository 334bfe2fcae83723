"""HeadsUp: one-step diffusion portrait super-resolution (arXiv 2510.09924), as a standalone library.

Importing this package is cheap: torch/diffusers are imported when a pipeline is built.
"""
from __future__ import annotations

import logging as _logging

__version__ = "0.1.0"


class _DropOptionalKernelNotice(_logging.Filter):
    """bitsandbytes (pulled in by pyiqa, imported through peft) warns at import time that the optional
    ``kernels`` package is missing ("Failed to load CPU gemm_4bit_forward ..."). Nothing here uses 4-bit
    kernels, and a user cannot tell that line from a real fault, so only that notice is dropped."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "gemm_4bit_forward" not in record.getMessage()


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropOptionalKernelNotice())
__all__ = ["HeadsUpPipeline", "UpscaleOptions", "__version__"]


def __getattr__(name):
    if name == "HeadsUpPipeline":
        from .pipeline import HeadsUpPipeline

        return HeadsUpPipeline
    if name == "UpscaleOptions":
        from .options import UpscaleOptions

        return UpscaleOptions
    raise AttributeError(name)
