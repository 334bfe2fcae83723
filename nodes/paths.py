"""Model folders: registration with ComfyUI's folder_paths and the lists shown in the loader widgets.

Folders (each also configurable through extra_model_paths.yaml under the same name):
  headsup        HeadsUp .safetensors and OSEDiff .pkl weights
  insightface    insightface packs as models/insightface/models/<pack>/*.onnx
  facedetection  facexlib weights (RetinaFace, BiSeNet parsing)
  ram            the DAPE tagger: ram_swin_large_14m.pth, DAPE.pth, ram_tag_list.txt, ram_tag_list_threshold.txt
The base SD2.x model comes from `checkpoints` (single file) or `diffusers` (a folder with model_index.json).
"""
import os

import folder_paths

from headsup_core.errors import MissingModelError

WEIGHT_EXTENSIONS = {".safetensors", ".pkl"}
RAM_EXTENSIONS = {".pth"}  # models/ram: RAM and DAPE weights, with RAM's tag list and thresholds beside them
DIFFUSERS_PREFIX = "diffusers/"
KNOWN_INSIGHTFACE_PACKS = ("antelopev2", "buffalo_l")
FACEXLIB_PREFIX = "facexlib/"  # pack entries for the facexlib backend name its RetinaFace detector
FACEXLIB_DETECTORS = ("retinaface_resnet50", "retinaface_mobile0.25")


def register_folders():
    """Add our folders without clobbering entries that extra_model_paths.yaml already created."""
    for name, exts in (("headsup", WEIGHT_EXTENSIONS), ("insightface", set()), ("facedetection", {".pth"}),
                       ("ram", RAM_EXTENSIONS)):
        default = os.path.join(folder_paths.models_dir, name)
        if name in folder_paths.folder_names_and_paths:
            paths = list(folder_paths.folder_names_and_paths[name][0])
            if default not in paths:
                paths.append(default)
        else:
            paths = [default]
        folder_paths.folder_names_and_paths[name] = (paths, exts)


def list_weights():
    return folder_paths.get_filename_list("headsup")


def list_bases():
    """Single-file checkpoints, then diffusers folders prefixed with `diffusers/`."""
    files = [f for f in folder_paths.get_filename_list("checkpoints")
             if os.path.splitext(f)[1].lower() in (".safetensors", ".ckpt")]
    folders = set()
    for root in folder_paths.get_folder_paths("diffusers"):
        if os.path.isdir(root):
            for dirpath, _dirs, names in os.walk(root, followlinks=True):
                if "model_index.json" in names:
                    folders.add(DIFFUSERS_PREFIX + os.path.relpath(dirpath, root).replace(os.sep, "/"))
    return files + sorted(folders)


def list_ram_weights():
    return folder_paths.get_filename_list("ram")


def resolve_ram(name):
    path = folder_paths.get_full_path("ram", name)
    if path is None:
        raise _missing("ram", name, "RAM/DAPE weights file")
    return path


def list_face_packs():
    """insightface packs found on disk, the well-known pack names (so a missing one gets a clear error),
    then the facexlib detectors (read from models/facedetection)."""
    found = set()
    for root in folder_paths.get_folder_paths("insightface"):
        packs_dir = os.path.join(root, "models")
        if os.path.isdir(packs_dir):
            for name in os.listdir(packs_dir):
                d = os.path.join(packs_dir, name)
                if os.path.isdir(d) and any(f.endswith(".onnx") for f in os.listdir(d)):
                    found.add(name)
    return (sorted(found) + [p for p in KNOWN_INSIGHTFACE_PACKS if p not in found]
            + [FACEXLIB_PREFIX + d for d in FACEXLIB_DETECTORS])


def _missing(folder, name, what):
    where = " or ".join(folder_paths.get_folder_paths(folder))
    return MissingModelError(f"The {what} '{name}' was not found; put it in {where} (ComfyUI's models/{folder} "
                             f"folder or a '{folder}' entry of extra_model_paths.yaml) and refresh.")


def resolve_weights(name):
    path = folder_paths.get_full_path("headsup", name)
    if path is None:
        raise _missing("headsup", name, "HeadsUp weights file")
    return path


def resolve_base(name):
    if name.startswith(DIFFUSERS_PREFIX):
        rel = name[len(DIFFUSERS_PREFIX):]
        for root in folder_paths.get_folder_paths("diffusers"):
            path = os.path.join(root, rel)
            if os.path.isfile(os.path.join(path, "model_index.json")):
                return path
        raise _missing("diffusers", rel, "diffusers base model folder")
    path = folder_paths.get_full_path("checkpoints", name)
    if path is None:
        raise _missing("checkpoints", name, "base model checkpoint")
    return path


def resolve_insightface_root(pack):
    """The insightface root (the folder holding models/<pack>/) that contains this pack."""
    roots = folder_paths.get_folder_paths("insightface")
    for root in roots:
        if os.path.isdir(os.path.join(root, "models", pack)):
            return root
    where = " or ".join(os.path.join(r, "models", pack) for r in roots)
    raise MissingModelError(f"The insightface pack '{pack}' was not found; put its .onnx files in {where}.")


def facexlib_root():
    """The first facedetection folder that exists (facexlib reads its weights from there)."""
    roots = folder_paths.get_folder_paths("facedetection")
    for root in roots:
        if os.path.isdir(root):
            return root
    return roots[0]
