"""Compatibility shim: base loading moved to ``headsup_core.loading.base`` (conv_in widening: ``loading.surgery``)."""
from .loading.base import *  # noqa: F401,F403
from .loading.base import TINY_CONFIG_KEY, _build, _wrong_arch_error  # noqa: F401
from .loading.surgery import widen_conv_in  # noqa: F401
