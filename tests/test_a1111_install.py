"""install.py decides correctly what to pip-install (through the webui's launch.run_pip)."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STUB = Path(__file__).resolve().parent / "a1111_stub"


@pytest.fixture
def install():
    spec = importlib.util.spec_from_file_location("headsup_install_under_test", ROOT / "install.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # importing must not install anything
    return mod


REQS = """
# comment
torch>=2.1
torchvision
diffusers>=0.30
Pillow>=10  # inline comment
opencv-python-headless>=4.8
onnxruntime>=1.16
--extra-index-url https://example.invalid
insightface>=0.7; python_version >= "3.10"
"""


def test_parse(install):
    names = [n for n, _ in install.parse_requirements(REQS)]
    assert names == ["torch", "torchvision", "diffusers", "pillow", "opencv-python-headless", "onnxruntime",
                     "insightface"]


def test_plan_installs_only_missing_and_never_torch(install):
    versions = {"diffusers": "0.31.0", "pillow": "9.5.0", "opencv-python-headless": None, "onnxruntime": None,
                "insightface": None, "torch": None, "torchvision": None}
    to_install, warnings = install.plan(install.parse_requirements(REQS), version_of=versions.get)
    assert to_install == ["opencv-python-headless>=4.8", "onnxruntime>=1.16",
                          'insightface>=0.7; python_version >= "3.10"']
    assert not any("torch" in x for x in to_install)
    assert len(warnings) == 1 and "pillow 9.5.0" in warnings[0]  # too old: warned, not upgraded


def test_alternative_distributions_count(install, monkeypatch):
    import importlib.metadata as md

    real = md.version

    def fake(name):
        if name == "opencv-python":
            return "4.9.0"
        if name in ("opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless"):
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(md, "version", fake)
    assert install.installed_version("opencv-python-headless") == "4.9.0"


def test_main_calls_run_pip_for_missing_only(install, monkeypatch, tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("numpy>=1.0\ntorch\nheadsup-surely-not-installed-pkg>=1\n")
    monkeypatch.setattr(install, "REQUIREMENTS", str(req))
    sys.path.insert(0, str(STUB))
    try:
        import launch

        launch.pip_calls.clear()
        install.main()
        assert launch.pip_calls == [('install "headsup-surely-not-installed-pkg>=1"',
                                     "HeadsUp requirement: headsup-surely-not-installed-pkg>=1")]
    finally:
        sys.path.remove(str(STUB))
        sys.modules.pop("launch", None)
