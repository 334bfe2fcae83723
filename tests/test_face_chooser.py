"""One face-backend choice for the CLI, ComfyUI and A1111 (headsup_core.faces.analyzer.choose_face_analyzer)."""
from __future__ import annotations

import pytest

from headsup_core.errors import InputImageError, MissingModelError
from headsup_core.faces import analyzer as faces


def test_none_gives_no_analyzer_and_a_reference_needs_one():
    assert faces.choose_face_analyzer("none") is None
    with pytest.raises(InputImageError, match="reference needs face analysis.*auto, dlib"):
        faces.choose_face_analyzer("none", required=True)


def test_auto_with_nothing_installed_is_none_or_the_one_install_sentence(monkeypatch, tmp_path):
    monkeypatch.setattr(faces, "find_backends", lambda *a, **k: [])
    roots = dict(insightface_root=tmp_path / "insightface", facexlib_root=tmp_path / "facedetection")
    assert faces.choose_face_analyzer("auto", **roots) is None
    with pytest.raises(MissingModelError) as err:
        faces.choose_face_analyzer("auto", required=True, **roots)
    assert str(err.value) == faces.NO_FACE_BACKEND and "pip install dlib-bin" in str(err.value)


def test_an_explicit_backend_loads_from_its_own_root(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(faces, "load_face_analyzer", lambda backend, model_root=None, **k: seen.append(
        (backend, model_root)) or object())
    for backend in ("insightface", "facexlib", "dlib"):
        faces.choose_face_analyzer(backend, insightface_root="I", facexlib_root="F", dlib_root="D")
    assert seen == [("insightface", "I"), ("facexlib", "F"), ("dlib", "D")]
