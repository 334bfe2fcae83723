"""The out-of-memory retry every front end uses: one plan per request, halved and rerun on out-of-memory.

A front end passes one small ``Host`` adapter for what its host does around an attempt (ComfyUI: its own OOM
exception, loading the weights with the plan's estimate, emptying its cache); the default suits the CLI, A1111
and eval.
"""
from __future__ import annotations

import logging

from .devices import empty_cache
from .errors import HeadsUpError
from .memory import is_oom
from .options import OPTION_NAMES, UpscaleOptions
from .planner import Plan

log = logging.getLogger("headsup")


class Host:
    """What a host does around each attempt. Subclass and override what differs."""

    def __init__(self, device=None):
        self.device = device

    def is_oom(self, exc: BaseException) -> bool:
        """Whether ``exc`` is an out-of-memory error (the attempt is then retried with smaller tiles)."""
        return is_oom(exc)

    def before_try(self, plan: Plan) -> None:
        """Runs before each attempt (e.g. ComfyUI loads the weights, reserving ``plan.estimate``)."""

    def after_oom(self) -> None:
        """Runs after an attempt ran out of memory, once its tensors are released."""
        if self.device is not None:
            empty_cache(self.device)


def upscale_with_retry(pipe, image, *, options: UpscaleOptions | None = None, host: Host | None = None,
                       **kwargs):
    """``pipe.upscale(image, options=..., **kwargs)`` on one plan; on out-of-memory, the plan's tiles halved and
    the request rerun (logged), until the tiles are at their minimum. Option keywords are applied to
    ``options`` once."""
    opts = UpscaleOptions.override(options, **{k: kwargs.pop(k) for k in list(kwargs) if k in OPTION_NAMES})
    host = host or Host(pipe.device)
    plan = pipe.plan(image, opts)
    while True:
        host.before_try(plan)
        try:
            return pipe.upscale(image, options=opts, plan=plan, **kwargs)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
            if not host.is_oom(exc):
                raise
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        # Outside the except block, so the failed attempt's tensors are released before the cache is emptied.
        host.after_oom()
        smaller = plan.halved()
        if smaller is None:
            raise HeadsUpError(f"HeadsUp ran out of memory even with the smallest tiles ({plan.describe()}): free "
                               "memory (close other models) or use a smaller image.")
        log.warning("HeadsUp: out of memory (%s) with tiles %s; retrying with %s.", reason, plan.describe(),
                    smaller.describe())
        plan = smaller
