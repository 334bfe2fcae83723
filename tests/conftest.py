"""Shared fixtures: the tiny models (written once per session by `make-tiny`) and the photos in insightface."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network: hub libraries are told to stay offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Same numerics on every CI machine: the CPU bf16 decoder default depends on the CPU's flags (headsup_core/perf.py),
# so tests run fp32 unless they ask for it (tests/test_perf.py checks that default).
os.environ.setdefault("HEADSUP_CPU_BF16", "none")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from headsup_core.testing.tiny_models import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny_models"))


def _insightface_image(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("insightface is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "images" / name
    if not path.exists():
        pytest.skip(f"{name} is not shipped with this insightface")
    return path


@pytest.fixture(scope="session")
def t1_jpg() -> Path:
    """Six people, 1280x886, shipped inside the insightface wheel."""
    return _insightface_image("t1.jpg")


@pytest.fixture(scope="session")
def tom_hanks_png() -> Path:
    """An aligned 112x112 face, shipped inside the insightface wheel."""
    return _insightface_image("Tom_Hanks_54745.png")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_models):
    from headsup_core import HeadsUpPipeline

    return HeadsUpPipeline.from_files(tiny_models["base"], tiny_models["headsup"], device="cpu")
