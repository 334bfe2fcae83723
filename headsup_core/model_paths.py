"""One model root for every sub-model (ComfyUI's folder layout), and the opt-in download of the base.

Layout under the root (the same names ComfyUI uses under ``models/``)::

    checkpoints/      SD2.x base single files (v2-1_512-ema-pruned.safetensors: SD2.1-base, what OSEDiff's weights
                      were trained on; sd_turbo.safetensors loads too but is a different, untested model for them)
    diffusers/        SD2.x bases in diffusers layout
    headsup/          HeadsUp .safetensors and OSEDiff .pkl weights
    insightface/models/<pack>/*.onnx
    facedetection/    facexlib weights

The root is ``--models DIR``, else ``$HEADSUP_MODEL_ROOT``, else ``~/.cache/headsup/models``.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import MissingModelError

# SD2.1-base first: OSEDiff's LoRA deltas were trained on it (EMA). SD-Turbo is only a last resort: its UNet is
# fully fine-tuned, so OSEDiff/HeadsUp weights on it are an untested model (a warning says so at load time).
BASE_CANDIDATES = ("v2-1_512-ema-pruned.safetensors", "v2-1_512-nonema-pruned.safetensors", "sd_turbo.safetensors")
HUB_BASE = ("stabilityai/stable-diffusion-2-1-base", "v2-1_512-ema-pruned.safetensors")
SUBFOLDERS = ("checkpoints", "diffusers", "headsup", "insightface/models", "facedetection")


def model_root(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("HEADSUP_MODEL_ROOT")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "headsup" / "models"


def find_base(root: Path) -> Path | None:
    for name in BASE_CANDIDATES:
        p = root / "checkpoints" / name
        if p.is_file():
            return p
    folder = root / "diffusers"
    if folder.is_dir():
        for child in sorted(folder.iterdir()):
            if (child / "unet" / "config.json").is_file():
                return child
    return None


def find_weights(root: Path) -> Path | None:
    folder = root / "headsup"
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".pkl"))
    return files[0] if files else None


def resolve_base(base: str | None, root: Path, download: bool = False) -> Path:
    if base:
        return Path(base)
    found = find_base(root)
    if found:
        return found
    if download:
        return download_base(root)
    raise MissingModelError(
        f"No base model given and none found: expected {root / 'checkpoints' / BASE_CANDIDATES[0]} (or "
        f"{BASE_CANDIDATES[1]}). Pass --base PATH, set HEADSUP_MODEL_ROOT, or add --download to fetch SD2.1-base."
    )


def download_base(root: Path) -> Path:
    """Opt-in: fetch SD2.1-base's single file into ``root/checkpoints``. Fails with a clear message offline."""
    repo, filename = HUB_BASE
    target = root / "checkpoints"
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise MissingModelError("Downloading needs the huggingface_hub package (pip install huggingface_hub).") from None
    try:
        path = hf_hub_download(repo, filename, local_dir=str(target))
    except Exception as err:  # noqa: BLE001 - any network/hub failure becomes one clear sentence
        raise MissingModelError(
            f"Could not download {filename} from the {repo} hub repository ({type(err).__name__}); you may be "
            f"offline. Download it by hand and put it at {target / filename}."
        ) from None
    return Path(path)
