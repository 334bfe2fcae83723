"""``headsup doctor``: which models were found where, what is missing, optional packages, devices, licences."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .licences import describe_licence
from .model_paths import BASE_CANDIDATES, find_base, model_root

OPTIONAL_PACKAGES = [
    ("insightface", "insightface", "face detection + identity (reference photos)"),
    ("onnxruntime", "onnxruntime", "runs insightface packs"),
    ("facexlib", "facexlib", "RetinaFace / BiSeNet face backend"),
    ("dlib", "dlib-bin", "dlib face backend (HOG/MMOD detection, 5 landmarks, identity)"),
    ("face_recognition_models", "face-recognition-models", "dlib's face model files"),
    ("cv2", "opencv-python-headless", "face alignment warps"),
    ("pyiqa", "pyiqa", "image-quality metrics (eval, dataset builder)"),
    ("lpips", "lpips", "LPIPS loss/metric"),
    ("kornia", "kornia", "training degradations"),
    ("accelerate", "accelerate", "trainer"),
]


def _line(ok: bool, text: str) -> str:
    return f"  [{'ok' if ok else '--'}] {text}"


def _files(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for pat in patterns for p in folder.glob(pat))


def report(root_arg=None) -> list[str]:
    import torch

    root = model_root(root_arg)
    lines = [f"HeadsUp doctor — model root: {root}" + ("" if root.is_dir() else "  (does not exist)")]
    base = find_base(root)
    lines.append("Base model (SD2.x):")
    lines.append(_line(base is not None, str(base) if base else
                       f"missing: put {BASE_CANDIDATES[0]} or {BASE_CANDIDATES[1]} in {root / 'checkpoints'}"))
    weights = _files(root / "headsup", ("*.safetensors", "*.pkl"))
    lines.append("HeadsUp / OSEDiff weights:")
    lines += [_line(True, str(w)) for w in weights] or [_line(False, f"none in {root / 'headsup'} (no trained "
                                                                      "HeadsUp weights are published yet; OSEDiff .pkl files load)")]
    packs = [p for p in sorted((root / "insightface" / "models").glob("*")) if p.is_dir() and any(p.glob("*.onnx"))]
    lines.append("insightface packs:")
    lines += [_line(True, f"{p} ({', '.join(sorted(f.name for f in p.glob('*.onnx')))})") for p in packs] or \
        [_line(False, f"none: unpack antelopev2 or buffalo_l into {root / 'insightface' / 'models'}/<pack>/")]
    fx = _files(root / "facedetection", ("*.pth",))
    lines.append("facexlib weights:")
    lines += [_line(True, str(f)) for f in fx] or [_line(False, f"none in {root / 'facedetection'}")]
    from .tags.files import DAPE_WEIGHTS, RAM_WEIGHTS, TAG_LIST, TAG_THRESHOLDS

    lines.append("DAPE tagger (--tags dape):")
    lines += [_line((root / "ram" / n).is_file(), str(root / "ram" / n)) for n in
              (RAM_WEIGHTS, DAPE_WEIGHTS, TAG_LIST, TAG_THRESHOLDS)]
    lines.append("Face backends (--faces auto takes the first):")
    try:
        from .faces.analyzer import find_backends

        found = find_backends(root / "insightface", root / "facedetection")
    except Exception as err:  # noqa: BLE001 - doctor reports a broken install instead of crashing
        found, err_note = [], f"face backends could not be checked: {err}"
        lines.append(_line(False, err_note))
    lines += [_line(True, f"{name}: {where}\n       licence: {note}") for name, where, note in found] or \
        [_line(False, "none: pip install dlib-bin face-recognition-models (public-domain models), or add an "
                      "insightface pack")]
    lines.append("Optional packages:")
    for module, pip_name, purpose in OPTIONAL_PACKAGES:
        ok = importlib.util.find_spec(module) is not None
        lines.append(_line(ok, f"{pip_name}: {purpose}" + ("" if ok else f"  (pip install {pip_name})")))
    if importlib.util.find_spec("onnxruntime") is not None:
        try:
            import onnxruntime

            lines.append(f"  onnxruntime providers: {', '.join(onnxruntime.get_available_providers())}")
        except Exception as err:  # noqa: BLE001 - a broken install is exactly what doctor reports
            lines.append(_line(False, f"onnxruntime fails to import: {err}"))
    lines.append(f"torch {torch.__version__}: cuda={'yes' if torch.cuda.is_available() else 'no'}, "
                 f"mps={'yes' if getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available() else 'no'}")
    notes = [describe_licence(str(p)) for p in [base, *weights, *packs, *fx] if p is not None]
    notes = [n for n in notes if n]
    if notes:
        lines.append("Licences:")
        lines += [f"  {n}" for n in notes]
    return lines


def run_doctor(root_arg=None, download: bool = False) -> int:
    if download:
        from .model_paths import download_base

        root = model_root(root_arg)
        if find_base(root) is None:
            print(f"downloaded {download_base(root)}")
    print("\n".join(report(root_arg)))
    return 0
