"""The tagger's files: where they are looked up, and the tagging tensors read out of RAM's and DAPE's checkpoints.

Files (OSEDiff's names), looked up in ``<model root>/ram/`` unless given explicitly; the vocabulary is also
looked up next to the RAM weights:

    ram_swin_large_14m.pth      RAM (Swin-L, 14M images), a dict with the state under "model"
    DAPE.pth                    OSEDiff's DAPE: RAM fine-tuned with LoRA on degraded images (a flat state dict)
    ram_tag_list.txt            4585 tags, one a line (class order)
    ram_tag_list_threshold.txt  one sigmoid threshold a line, same order

Only the tensors tagging needs are read (the checkpoints also hold RAM's text decoder and tag encoder):
``torch.load(weights_only=True, mmap=True)`` maps the file and a tensor is read when it is used.

What RAM's own code does when it loads these, restated (OSEDiff's ``ram/models/ram_lora.py`` with loralib):
- the RAM file's ``vision_multi.*`` tensors are renamed ``tagging_head.*``; then DAPE.pth is loaded over it;
- the tagging head's layers share their cross-attention and feed-forward parameters with the first layers of the
  tag encoder (``tie_encoder_decoder_weights``), so a tensor found under either name sets the shared one, the
  ``tagging_head`` name loaded last (RAM file first, then DAPE);
- LoRA (``lora_A``/``lora_B``, scaling 1/r) sits on the Swin's ``qkv`` (q and v parts) and on the cross-attention
  ``query``/``key``; switching the model to eval merges every LoRA into its weight, so a shared weight also gets the
  tag encoder's LoRA delta.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MissingModelError, WeightsError
from ..model_paths import model_root

RAM_WEIGHTS = "ram_swin_large_14m.pth"
DAPE_WEIGHTS = "DAPE.pth"
TAG_LIST = "ram_tag_list.txt"
TAG_THRESHOLDS = "ram_tag_list_threshold.txt"
RAM_FOLDER = "ram"
DEFAULT_THRESHOLD = 0.68   # RAM's class threshold before the per-class file adjusts it
MAX_THRESHOLD = 0.9        # OSEDiff's RAMLora: file values above it are kept, others capped at it
QKV_LORA_PARTS = (True, False, True)  # RAM's Swin: loralib MergedLinear on q and v, not k
HEAD_LORA = ("query", "key")          # RAM's BERT cross-attention: loralib Linear on query and key
HEAD_LAYERS = 2                       # RAM's q2l_config.json, when the file names no tagging_head layer


@dataclass(frozen=True)
class TaggerFiles:
    ram: Path
    dape: Path | None
    tag_list: Path
    thresholds: Path


def ram_folder(root=None) -> Path:
    return model_root(root) / RAM_FOLDER


def find_tagger_files(root=None, ram=None, dape=None, tag_list=None, thresholds=None,
                      use_dape: bool = True) -> TaggerFiles:
    """Explicit paths win; otherwise ``<root>/ram/<OSEDiff's name>``. The vocabulary is taken next to the RAM
    weights when there, else from ``<root>/ram/``. One error names every missing file."""
    folder = ram_folder(root)
    ram_p = Path(ram) if ram else folder / RAM_WEIGHTS
    dape_p = (Path(dape) if dape else folder / DAPE_WEIGHTS) if use_dape else None

    def vocab(explicit, name):
        if explicit:
            return Path(explicit)
        beside = ram_p.parent / name
        return beside if beside.is_file() else folder / name

    files = TaggerFiles(ram_p, dape_p, vocab(tag_list, TAG_LIST), vocab(thresholds, TAG_THRESHOLDS))
    what = {"ram": "RAM weights", "dape": "DAPE weights (OSEDiff's RAM LoRA)", "tag_list": "RAM tag list",
            "thresholds": "RAM tag thresholds"}
    missing = [f"{what[k]} {p}" for k, p in vars(files).items() if p is not None and not Path(p).is_file()]
    if missing:
        raise MissingModelError(
            "The DAPE tagger needs files that are missing: " + "; ".join(missing) + ". Put OSEDiff's "
            f"{RAM_WEIGHTS} and {DAPE_WEIGHTS} (its README links them) and RAM's {TAG_LIST} and {TAG_THRESHOLDS} "
            f"(OSEDiff's ram/data/) in {folder}, or pass their paths.")
    return files


def read_vocabulary(files: TaggerFiles, num_classes: int | None = None):
    """(tags, thresholds): the tag names and their class thresholds as RAM computes them."""
    with open(files.tag_list, encoding="utf-8") as f:
        tags = f.read().splitlines()
    try:
        with open(files.thresholds, encoding="utf-8") as f:
            raw = [float(s.strip()) for s in f if s.strip()]
    except ValueError as err:
        raise WeightsError(f"{files.thresholds} must hold one number a line ({err}).") from None
    if len(raw) != len(tags) or (num_classes is not None and len(tags) != num_classes):
        raise WeightsError(
            f"The tag files do not match: {files.tag_list} has {len(tags)} tags, {files.thresholds} "
            f"{len(raw)} thresholds" + (f", the weights {num_classes} classes" if num_classes else "") + ".")
    th = torch.full((len(raw),), DEFAULT_THRESHOLD)
    for i, v in enumerate(raw):
        th[i] = v if v > MAX_THRESHOLD else min(v, MAX_THRESHOLD)
    return tags, th


def _load(path: Path, renames: bool) -> dict:
    from ..loading.weight_files import torch_load_safely

    sd = torch_load_safely(str(path))
    for wrapper in ("model", "params"):
        if isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
            break
    if renames:  # RAM's load_checkpoint_swinlarge
        sd = {k.replace("vision_multi", "tagging_head"): v for k, v in sd.items()}
    return sd


def _lora_delta(sd_get, prefix: str, weight: torch.Tensor, parts=None) -> torch.Tensor | None:
    a, b = sd_get(prefix + "lora_A"), sd_get(prefix + "lora_B")
    if b is None:
        return None
    if a is None:
        raise WeightsError(f"{prefix}lora_B is in the weights but {prefix}lora_A is not.")
    a, b = a.float(), b.float()
    if parts is None:
        r = a.shape[0]
        return (b @ a) / r
    groups = sum(parts)
    r = a.shape[0] // groups
    delta = torch.zeros_like(weight, dtype=torch.float32)
    rows = weight.shape[0] // len(parts)
    g = 0
    for i, on in enumerate(parts):
        if on:
            delta[i * rows:(i + 1) * rows] = b[g * rows:(g + 1) * rows] @ a[g * r:(g + 1) * r]
            g += 1
    return delta / r


def expected_keys(keys, get, n_head: int) -> list[str]:
    """The parameter names of the tagging network these tensors describe (its shapes read from them)."""
    from .head import HeadConfig, RamTaggingNet
    from .swin import SwinConfig

    swin = SwinConfig.from_state_dict({k: get(k) for k in keys if k.startswith("visual_encoder.")}, "visual_encoder.")
    probe = {k: get(k) for k in ("label_embed", "wordvec_proj.weight")}
    inter = "encoder.layer.0.intermediate.dense.weight"
    probe["tagging_head." + inter] = get("tagging_head." + inter)
    if probe["tagging_head." + inter] is None:
        probe["tagging_head." + inter] = get("tag_encoder." + inter)
    if any(v is None for v in probe.values()):
        raise WeightsError("The weights hold no RAM tagging head (label_embed, wordvec_proj, tagging_head).")
    head = HeadConfig(num_classes=int(probe["label_embed"].shape[0]), label_dim=int(probe["label_embed"].shape[1]),
                      hidden=int(probe["wordvec_proj.weight"].shape[0]), num_layers=n_head,
                      intermediate=int(probe["tagging_head." + inter].shape[0]))
    with torch.device("meta"):
        net = RamTaggingNet(swin, head)
    return list(net.state_dict())


def tagging_state_dict(ram_path, dape_path=None) -> dict:
    """The tagging network's tensors (``RamTaggingNet`` names), LoRA merged, as RAM's code ends up with them."""
    ram_sd = _load(Path(ram_path), renames=True)
    dape_sd = _load(Path(dape_path), renames=False) if dape_path else {}

    def get(key):
        return dape_sd[key] if key in dape_sd else ram_sd.get(key)

    def get_shared(key):  # a tagging-head parameter tied to the tag encoder's: see the module docstring
        alias = key.replace("tagging_head.", "tag_encoder.", 1)
        for sd in (dape_sd, ram_sd):
            for k in (key, alias):
                if k in sd:
                    return sd[k]
        return None

    keys = {**ram_sd, **dape_sd}
    heads = {int(m.group(1)) for k in keys if (m := re.match(r"tagging_head\.encoder\.layer\.(\d+)\.", k))}
    n_head = max(heads) + 1 if heads else HEAD_LAYERS
    try:
        names = expected_keys(keys, get, n_head)
    except WeightsError:
        raise
    except (KeyError, ValueError, IndexError) as err:
        raise WeightsError(f"{ram_path} is not a RAM checkpoint: no Swin visual encoder in RAM's layout "
                           f"(visual_encoder.patch_embed / layers.<i>.blocks.<j>; {err}).") from None
    out, missing = {}, []
    for key in names:
        t = get_shared(key) if key.startswith("tagging_head.") else get(key)
        if t is None:
            missing.append(key)
            continue
        out[key] = t.float() if t.dtype != torch.float32 else t
    if missing:
        raise WeightsError(f"{ram_path} is not a RAM checkpoint: {len(missing)} tagging tensor(s) missing, e.g. "
                           + ", ".join(missing[:3]) + ".")
    for key in [k for k in out if k.endswith(".qkv.weight") and k.startswith("visual_encoder.")]:
        d = _lora_delta(get, key[:-len("weight")], out[key], QKV_LORA_PARTS)
        if d is not None:
            out[key] = out[key] + d
    for i in range(n_head):
        for name in HEAD_LORA:
            key = f"tagging_head.encoder.layer.{i}.crossattention.self.{name}.weight"
            for owner in ("tagging_head.", "tag_encoder."):
                d = _lora_delta(get, owner + key[len("tagging_head."):-len("weight")], out[key])
                if d is not None:
                    out[key] = out[key] + d
    return out


def describe(files: TaggerFiles) -> str:
    parts = [os.fspath(files.ram)] + ([os.fspath(files.dape)] if files.dape else [])
    return " + ".join(parts)
