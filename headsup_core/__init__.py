"""HeadsUp: one-step diffusion portrait super-resolution (arXiv 2510.09924), as a standalone library.

Importing this package is cheap: torch/diffusers are imported when a pipeline is built.
"""
from __future__ import annotations

import logging as _logging

from .version import __version__


# Third-party notices a normal run prints that say nothing about the user's job, as (logger, text in the message).
# Each is dropped at its own logger, by its own text, so every other line (and all of ours) still shows.
_THIRD_PARTY_NOTICES = (
    # bitsandbytes (pulled in by pyiqa, imported through peft): the optional 4-bit CPU kernels are missing.
    ("bitsandbytes.backends.cpu.ops", "gemm_4bit_forward"),
    # kernels (pulled in by transformers >= 5.2x for bitsandbytes): with HF_HUB_OFFLINE=1, common on render boxes,
    # it says it cannot check a kernel publisher online. Nothing here downloads or runs hub kernels.
    ("kernels._internals.hf_hub", "publisher trust check"),
)


class _DropNotice(_logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: _logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


for _logger_name, _text in _THIRD_PARTY_NOTICES:
    _logging.getLogger(_logger_name).addFilter(_DropNotice(_text))
__all__ = ["HeadsUpPipeline", "UpscaleOptions", "__version__"]


def __getattr__(name):
    if name == "HeadsUpPipeline":
        from .pipeline import HeadsUpPipeline

        return HeadsUpPipeline
    if name == "UpscaleOptions":
        from .options import UpscaleOptions

        return UpscaleOptions
    raise AttributeError(name)
