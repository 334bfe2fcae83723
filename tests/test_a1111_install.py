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
    versions = {"diffusers": "0.32.1", "pillow": "9.5.0", "opencv-python-headless": None, "onnxruntime": None,
                "insightface": None, "torch": None, "torchvision": None}
    to_install, warnings = install.plan(install.parse_requirements(REQS), version_of=versions.get)
    assert to_install == ["opencv-python-headless>=4.8", "onnxruntime>=1.16",
                          'insightface>=0.7; python_version >= "3.10"']
    assert not any("torch" in x for x in to_install)
    assert len(warnings) == 1 and "keeping the webui's pillow 9.5.0" in warnings[0]  # tested: kept, not upgraded


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


A1111_PINS = {  # A1111 1.8-1.10 requirements_versions.txt, and what such a webui has installed
    "transformers": "4.30.2", "accelerate": "0.21.0", "einops": "0.4.1", "pillow": "9.5.0", "numpy": "1.26.2",
    "safetensors": "0.4.2", "facexlib": "0.3.0", "tqdm": "4.66.1", "pyyaml": "6.0.1", "torch": "2.1.2",
    "opencv-python-headless": "4.9.0.80",
}


def test_plan_next_to_a1111_pins_upgrades_nothing_of_the_webui(install):
    reqs = install.parse_requirements(Path(install.REQUIREMENTS).read_text())
    reqs += [("transformers", "transformers>=4.40"), ("einops", "einops>=0.7"), ("pillow", "Pillow>=10")]
    to_install, messages = install.plan(reqs, version_of=A1111_PINS.get)
    names = {n for n, _ in install.parse_requirements("\n".join(to_install))}
    assert not names & {"transformers", "einops", "pillow", "accelerate", "numpy", "safetensors", "torch"}
    # what it installs instead of the newest diffusers/peft: the windows that import with transformers 4.30.2
    assert "diffusers>=0.32,<0.37" in to_install and "peft>=0.11,<0.14" in to_install
    text = "\n".join(messages)
    assert "Dinov2WithRegistersConfig" in text and "transformers.Cache" in text  # says why
    for kept in ("transformers 4.30.2", "einops 0.4.1", "pillow 9.5.0"):
        assert f"keeping the webui's {kept}" in text


def test_plan_replaces_only_what_cannot_work(install):
    reqs = install.parse_requirements("diffusers>=0.30\npeft>=0.11\nPillow>=10\n")
    versions = {"transformers": "4.57.0", "diffusers": "0.30.3", "peft": "0.17.0", "pillow": "9.0.0"}
    to_install, messages = install.plan(reqs, version_of=versions.get)
    assert to_install == ["diffusers>=0.30"]  # a new transformers: no window; old diffusers lacks add_adapter
    assert any("upgrading diffusers 0.30.3" in m and "add_adapter" in m for m in messages)
    assert any("pillow 9.0.0" in m and "left as is" in m for m in messages)  # older than tested: a warning only
    # next to an old transformers, a peft that cannot import there is replaced, and the message says so
    to_install, messages = install.plan(reqs, version_of=dict(versions, transformers="4.30.2").get)
    assert "peft>=0.11,<0.14" in to_install and any("replacing peft 0.17.0" in m for m in messages)
