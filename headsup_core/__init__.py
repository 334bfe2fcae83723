"""HeadsUp: one-step diffusion portrait super-resolution (arXiv 2510.09924), as a standalone library.

Importing this package is cheap: torch/diffusers are imported when a pipeline is built.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["HeadsUpPipeline", "__version__"]


def __getattr__(name):
    if name == "HeadsUpPipeline":
        from .pipeline import HeadsUpPipeline

        return HeadsUpPipeline
    raise AttributeError(name)
