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
    # dlib's models (face-recognition-models package, MIT packaging): Davis King released them into the public
    # domain (dlib-models README). The 68-point predictor is listed so that doctor can warn; HeadsUp never loads it.
    ("shape_predictor_68", "dlib 68-point predictor: trained on iBUG 300-W, whose licence excludes commercial use "
                           "(HeadsUp does not use it)."),
    ("shape_predictor_5_face", "dlib 5-point landmarks: public domain (Davis King; dlib 5-point dataset, his own "
                               "annotations); commercial use allowed."),
    ("dlib_face_recognition_resnet", "dlib ResNet face descriptor: public domain (Davis King; trained on FaceScrub, "
                                     "VGG-Face and web images); commercial use allowed."),
    ("mmod_human_face", "dlib MMOD face detector: public domain (Davis King; dlib face detection dataset, his own "
                        "annotations); commercial use allowed."),
    ("frontal_face_detector", "dlib HOG face detector: built into dlib, Boost Software License (trained on Davis "
                              "King's labels of LFW images); commercial use allowed."),
    ("detection_mobilenet0.25", "facexlib RetinaFace (mobilenet0.25): MIT (facexlib); trained on WIDER FACE "
                                "(research)."),
]


def describe_licence(path: str) -> str | None:
    name = os.path.basename(os.path.normpath(path)).lower()
    for key, note in KNOWN_LICENCES:
        if key in name:
            return f"Licence of {os.path.basename(path)}: {note}"
    return None
