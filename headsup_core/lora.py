"""Compatibility shim: LoRA placement and merging moved to ``headsup_core.loading.surgery``."""
from .loading.surgery import *  # noqa: F401,F403
