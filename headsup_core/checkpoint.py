"""Compatibility shim: weights formats moved to ``headsup_core.loading.weights``."""
from .loading.weights import *  # noqa: F401,F403
from .loading.weights import _atomic_save, _merged_conv_in  # noqa: F401
