"""Licences of the weights files the pack can load (shown at load time, by `headsup doctor` and in the README)."""
from __future__ import annotations

import os

# (filename substring, lower case) -> licence note. First match wins.
KNOWN_LICENCES: list[tuple[str, str]] = [
    ("sd_turbo", "SD-Turbo: Stability AI Non-Commercial Research Community License (non-commercial)."),
    ("sd-turbo", "SD-Turbo: Stability AI Non-Commercial Research Community License (non-commercial)."),
    ("v2-1", "Stable Diffusion 2.1: CreativeML Open RAIL++-M (commercial use allowed, use restrictions apply)."),
    ("stable-diffusion-2", "Stable Diffusion 2.x: CreativeML Open RAIL++-M (use restrictions apply)."),
    ("osediff", "OSEDiff weights: Apache-2.0 code release; the weights inherit the SD2.1 base licence."),
    ("antelopev2", "insightface antelopev2: non-commercial research use only."),
    ("buffalo", "insightface buffalo_l: non-commercial research use only."),
    ("detection_resnet50", "facexlib RetinaFace: MIT (facexlib); trained on WIDER FACE (research)."),
    ("parsing_", "facexlib BiSeNet parsing: MIT (facexlib); trained on CelebAMask-HQ (non-commercial)."),
    ("codeformer", "CodeFormer: S-Lab License 1.0 (non-commercial)."),
]


def describe_licence(path: str) -> str | None:
    name = os.path.basename(os.path.normpath(path)).lower()
    for key, note in KNOWN_LICENCES:
        if key in name:
            return f"Licence of {os.path.basename(path)}: {note}"
    return None
