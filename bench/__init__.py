"""Benchmarks. Run one as ``python -m bench.pipeline`` from the repository root, or as ``python bench/pipeline.py``
(each script then puts the repository root on ``sys.path`` itself, for ``headsup_core`` and ``bench``)."""

import headsup_core  # noqa: E402,F401  first: its filters for third-party import-time notices (bitsandbytes) apply
