"""No-reference quality scorers for the dataset builder (pyiqa, imported lazily)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def make_pyiqa_scorer(metric: str, weights: str | None, device: str | None) -> tuple[Callable | None, str]:
    """(scorer, note). A metric whose weights cannot be loaded offline gives (None, reason): the rule is skipped."""
    if metric in (None, "", "none"):
        return None, "quality rule disabled (--quality-metric none)"
    try:
        import pyiqa
        import torch
    except ImportError:
        return None, "quality rule skipped: pyiqa is not installed (pip install pyiqa)"
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kw = {"pretrained_model_path": weights} if weights else {}
    try:
        m = pyiqa.create_metric(metric, device=dev, as_loss=False, **kw)
    except Exception as e:  # offline: the download of the metric's weights fails
        return None, (f"quality rule skipped: pyiqa metric {metric!r} could not be loaded ({type(e).__name__}: "
                      f"{str(e)[:200]}); put its weights in pyiqa's cache or pass --quality-weights")

    def score(rgb: np.ndarray) -> float:
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div(255).to(dev)
        with torch.no_grad():
            return float(m(x).flatten()[0])

    return score, f"pyiqa {metric} ({'higher' if not m.lower_better else 'lower'} is better)"
