"""Language description extraction: OSEDiff's DAPE tags (RAM, LoRA-tuned on degraded images), offline.

``DapeTagger`` is a ``tag_source`` for ``HeadsUpPipeline`` (LQ image -> "tag, tag, ..."); the pipeline puts
the tags into OSEDiff's prompt form ``f"{tags}, {prompt},"``. Nothing heavy is imported until a name is used,
and the weights are read on the tagger's first call.
"""
from __future__ import annotations

import importlib

_EXPORTS = {"DapeTagger": "tagger", "preprocess": "tagger", "find_tagger_files": "files", "TaggerFiles": "files",
            "RAM_WEIGHTS": "files", "DAPE_WEIGHTS": "files", "TAG_LIST": "files", "TAG_THRESHOLDS": "files",
            "RAM_FOLDER": "files"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
