"""A1111 / Forge extension installer: pip-installs what requirements.txt lists, only what is missing.

The webui runs this file with its own Python when it loads the extension. It never installs or upgrades torch,
torchvision, torchaudio or xformers (the webui owns them), and it never upgrades a package the webui already
has (that could break the webui); it only warns when an installed version is older than requirements.txt asks.
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


def _too_old(version: str, requirement: str) -> bool:
    try:
        from packaging.requirements import Requirement

        return not Requirement(requirement).specifier.contains(version, prereleases=True)
    except Exception:  # no packaging, or an unusual line: do not guess
        return False


def plan(requirements: list[tuple[str, str]], version_of=installed_version) -> tuple[list[str], list[str]]:
    """``(to_install, warnings)``: missing requirements to install, and notes about old versions."""
    to_install, warnings = [], []
    for name, line in requirements:
        if name in NEVER:
            continue
        version = version_of(name)
        if version is None:
            to_install.append(line)
        elif _too_old(version, line):
            warnings.append(f"HeadsUp: {name} {version} is installed but requirements.txt asks for {line}; "
                            "left as is so the webui keeps working. Upgrade it yourself if HeadsUp fails.")
    return to_install, warnings


def main() -> None:
    import launch

    with open(REQUIREMENTS, encoding="utf-8") as fh:
        to_install, warnings = plan(parse_requirements(fh.read()))
    for w in warnings:
        print(w)
    for line in to_install:
        launch.run_pip(f'install "{line}"', f"HeadsUp requirement: {line}")


if __name__ == "__main__":
    main()
