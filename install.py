"""A1111 / Forge extension installer: pip-installs what requirements.txt lists, only what is missing or unusable.

The webui runs this file with its own Python when it loads the extension. It never installs or upgrades torch,
torchvision, torchaudio or xformers (the webui owns them), and never upgrades a package the webui pins. Before it
runs pip it prints every change it will make and why.

Next to A1111 1.8-1.10's pins (transformers 4.30.2, accelerate 0.21.0, einops 0.4.1, Pillow 9.5.0) the floors of
requirements.txt (transformers>=4.40, einops>=0.7, Pillow>=10) cannot be installed without upgrading the webui's
own packages. They are not needed: HeadsUp's pipeline was run with exactly those pins (single-file and diffusers
bases, HeadsUp and OSEDiff weights). What such a webui needs instead is a diffusers and a peft that still import
with its transformers and accelerate, so those two are installed within tested windows (``WEBUI_WINDOWS``).
"""
from __future__ import annotations

import importlib.metadata
import os
import re

REQUIREMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "requirements.txt")
NEVER = {"torch", "torchvision", "torchaudio", "xformers"}
# one requirement is satisfied by any of these distributions (installing a second OpenCV build breaks cv2)
ALTERNATIVES = {
    "opencv-python-headless": ("opencv-python-headless", "opencv-python", "opencv-contrib-python",
                               "opencv-contrib-python-headless"),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-silicon"),
}
# Older than requirements.txt asks, but HeadsUp runs with them (tested with A1111 1.8's pins): never upgraded.
TESTED_OLDER = {"transformers": ("4.30", "HeadsUp runs with transformers 4.30.2"),
                "pillow": ("9.5", "HeadsUp runs with Pillow 9.5.0"),
                "einops": ("0", "headsup_core does not import einops")}
# Versions that must be replaced whatever the webui: what breaks, and the requirement installed instead.
REPLACE_IF_OLDER = {
    "diffusers": ("0.32", "diffusers 0.30-0.31 have no AutoencoderKL.add_adapter, which HeadsUp's VAE LoRA uses"),
}
# With a webui's old transformers (< 4.40, e.g. A1111's 4.30.2 with accelerate 0.21.0), the newest diffusers/peft
# do not import. Tested: diffusers 0.32.2-0.36.0 and peft 0.13.2 work there; diffusers 0.37 imports
# transformers.Dinov2WithRegistersConfig, peft 0.14 transformers.Cache, peft 0.15+ accelerate's clear_device_cache.
OLD_TRANSFORMERS = "4.40"
WEBUI_WINDOWS = {
    "diffusers": ("diffusers>=0.32,<0.37", "diffusers 0.37+ imports transformers.Dinov2WithRegistersConfig"),
    "peft": ("peft>=0.11,<0.14", "peft 0.14 imports transformers.Cache and 0.15+ accelerate's clear_device_cache"),
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirements(text: str) -> list[tuple[str, str]]:
    """``(name, full requirement line)`` for every requirement, skipping comments, options and markers."""
    out = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        if m:
            out.append((_norm(m.group(1)), line))
    return out


def installed_version(name: str) -> str | None:
    for dist in ALTERNATIVES.get(name, (name,)):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _version_tuple(version: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def _older(version: str, floor: str) -> bool:
    return _version_tuple(version) < _version_tuple(floor)


def _satisfies(version: str, requirement: str) -> bool:
    try:
        from packaging.requirements import Requirement

        return Requirement(requirement).specifier.contains(version, prereleases=True)
    except Exception:  # noqa: BLE001 - no packaging, or an unusual line: do not guess
        return True


def plan(requirements: list[tuple[str, str]], version_of=installed_version) -> tuple[list[str], list[str]]:
    """``(to_install, messages)``: requirements to pip-install, and one line per change or kept old version."""
    to_install, messages = [], []
    transformers = version_of("transformers")
    old_webui = transformers is not None and _older(transformers, OLD_TRANSFORMERS)
    for name, line in requirements:
        if name in NEVER:
            continue
        version = version_of(name)
        if old_webui and name in WEBUI_WINDOWS:
            window, why = WEBUI_WINDOWS[name]
            if version is None or not _satisfies(version, window):
                have = f"replacing {name} {version} with" if version else "installing"
                messages.append(f"HeadsUp: {have} {window} instead of {line}: the webui's transformers "
                                f"{transformers} is older than {OLD_TRANSFORMERS} and {why}.")
                to_install.append(window)
            continue
        if version is None:
            to_install.append(line)
        elif name in REPLACE_IF_OLDER and _older(version, REPLACE_IF_OLDER[name][0]):
            messages.append(f"HeadsUp: upgrading {name} {version} to {line}: {REPLACE_IF_OLDER[name][1]}.")
            to_install.append(line)
        elif name in TESTED_OLDER and not _older(version, TESTED_OLDER[name][0]):
            if not _satisfies(version, line):
                messages.append(f"HeadsUp: keeping the webui's {name} {version} although requirements.txt asks for "
                                f"{line}: {TESTED_OLDER[name][1]}.")
        elif not _satisfies(version, line):
            messages.append(f"HeadsUp: {name} {version} is installed but requirements.txt asks for {line}; "
                            "left as is so the webui keeps working. Upgrade it yourself if HeadsUp fails.")
    return to_install, messages


def main() -> None:
    import launch

    with open(REQUIREMENTS, encoding="utf-8") as fh:
        to_install, messages = plan(parse_requirements(fh.read()))
    for m in messages:
        print(m)
    for line in to_install:
        launch.run_pip(f'install "{line}"', f"HeadsUp requirement: {line}")


if __name__ == "__main__":
    main()
