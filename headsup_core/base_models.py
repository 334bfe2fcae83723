"""Loading the SD2.x base (UNet + VAE) offline, from a diffusers folder or one single-file checkpoint.

Single files (ComfyUI's ``v2-1_512-ema-pruned.safetensors``, ``sd_turbo.safetensors`` ...) are read safely
(safetensors, or ``torch.load(weights_only=True)``), their architecture is identified from the tensor names
and shapes, and they are converted with diffusers' own LDM->diffusers key conversion against the configs that
ship inside this package. Nothing is ever fetched from a hub.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import MissingModelError, WeightsError

log = logging.getLogger("headsup")
CONFIG_DIR = Path(__file__).parent / "configs"
LDM_UNET = "model.diffusion_model."
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
TINY_CONFIG_KEY = "headsup_base_config"  # metadata key with diffusers configs, written by `make-tiny` only


@dataclass
class BaseModels:
    unet: Any
    vae: Any
    prediction_type: str  # "epsilon" | "v_prediction"
    arch: str  # e.g. "sd2"
    source: str
    text_encoder_loader: Callable[[], tuple[Any, Any]] | None = None  # -> (tokenizer, text_encoder)
    extra: dict = field(default_factory=dict)


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a weights file safely. Returns (tensors, safetensors metadata). Raises WeightsError when unsafe/corrupt."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingModelError(f"Weights file not found: {path}")
    if os.path.getsize(path) == 0:
        raise WeightsError(f"The weights file {path} is empty (0 bytes); download or copy it again.")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        try:
            tensors, meta = {}, {}
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
            return tensors, meta
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise WeightsError(
                f"The safetensors file {path} is corrupt or truncated ({err}); download or copy it again."
            ) from None
    return _torch_load_safely(path), {}


def _torch_load_safely(path: str) -> dict:
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsError(
            f"Refusing to load {path}: it is a pickle that contains code or objects other than tensors ({err}). "
            "Only plain tensor checkpoints are loaded; convert it to .safetensors with a trusted tool."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError) as err:
        raise WeightsError(f"Cannot read {path}: the file is corrupt or not a torch checkpoint ({err}).") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} does not contain a dictionary of tensors (found {type(obj).__name__}).")
    return obj


def identify_architecture(sd: dict[str, torch.Tensor]) -> str:
    """Name the model family of an LDM-layout state dict: sd2, sd1, sdxl, flux, sd3, or unknown."""
    keys = sd.keys()
    if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys):
        return "flux"
    if any("joint_blocks." in k for k in keys):
        return "sd3"
    if any(k.startswith("conditioner.embedders.") for k in keys) or f"{LDM_UNET}label_emb.0.0.weight" in sd:
        return "sdxl"
    proj_in = sd.get(f"{LDM_UNET}input_blocks.1.1.proj_in.weight")
    if proj_in is None:  # small variants put their first attention deeper
        proj_in = next((v for k, v in sd.items() if k.startswith(LDM_UNET) and k.endswith(".proj_in.weight")), None)
    if proj_in is not None:
        return "sd2" if proj_in.ndim == 2 else "sd1"
    if f"{LDM_UNET}input_blocks.0.0.weight" in sd:
        return "unknown-unet"
    return "unknown"


def _wrong_arch_error(path: str, found: str) -> WeightsError:
    names = {"sd1": "Stable Diffusion 1.x", "sdxl": "SDXL", "flux": "Flux", "sd3": "SD3",
             "unknown-unet": "an unrecognised UNet", "unknown": "no Stable Diffusion UNet at all"}
    return WeightsError(
        f"{path} is {names.get(found, found)}, but HeadsUp needs a Stable Diffusion 2.x base (SD2.1-base or "
        "SD-Turbo, e.g. v2-1_512-ema-pruned.safetensors or sd_turbo.safetensors)."
    )


def guess_prediction_type(sd: dict[str, torch.Tensor]) -> str:
    # The same heuristic ComfyUI uses for SD2 single files: v-prediction models have a large spread here.
    bias = sd.get(f"{LDM_UNET}output_blocks.11.1.transformer_blocks.0.norm1.bias")
    if bias is not None and torch.std(bias.float(), unbiased=False) > 0.09:
        return "v_prediction"
    return "epsilon"


def _build(cls, config: dict, state: dict, what: str, path: str):
    # Build on the meta device and assign the loaded tensors: no random init of ~900M parameters.
    with torch.device("meta"):
        model = cls.from_config(config)
    expected = set(model.state_dict().keys())
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise WeightsError(
            f"{path}: the {what} weights do not fit the SD2.x {what} layout "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors, e.g. {(missing or unexpected)[:3]})."
        )
    _check_shapes(model, state, what, path)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


def _check_shapes(model: torch.nn.Module, state: dict, what: str, path: str) -> None:
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise WeightsError(
                f"{path}: the {what} tensor {key} has shape {tuple(value.shape)} but SD2.x needs "
                f"{tuple(own[key].shape)}; this is not an SD2.x-architecture checkpoint."
            )


def load_single_file(path: str, prediction_type: str | None = None) -> BaseModels:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    sd, meta = read_state_dict(path)
    arch = identify_architecture(sd)
    if arch != "sd2":
        raise _wrong_arch_error(path, arch)
    if TINY_CONFIG_KEY in meta:
        configs = json.loads(meta[TINY_CONFIG_KEY])
        unet_cfg, vae_cfg = configs["unet"], configs["vae"]
    else:
        unet_cfg = UNet2DConditionModel.load_config(CONFIG_DIR / "sd2" / "unet")
        vae_cfg = AutoencoderKL.load_config(CONFIG_DIR / "sd2" / "vae")
    if not any(k.startswith("first_stage_model.") for k in sd):
        raise WeightsError(f"{path} has a UNet but no VAE (first_stage_model.*); use a full SD2.x checkpoint.")
    unet_sd = convert_ldm_unet_checkpoint(sd, dict(unet_cfg))
    vae_sd = convert_ldm_vae_checkpoint(sd, dict(vae_cfg))
    unet = _build(UNet2DConditionModel, unet_cfg, unet_sd, "UNet", path)
    vae = _build(AutoencoderKL, vae_cfg, vae_sd, "VAE", path)
    pred = prediction_type or meta.get("prediction_type") or guess_prediction_type(sd)
    return BaseModels(unet, vae, pred, "sd2", path, text_encoder_loader=None)


def _check_diffusers_arch(unet, vae, path: str) -> None:
    cfg = unet.config
    if getattr(cfg, "addition_embed_type", None) == "text_time":
        raise _wrong_arch_error(path, "sdxl")
    if not getattr(cfg, "use_linear_projection", False):
        raise _wrong_arch_error(path, "sd1")
    if vae.config.latent_channels != 4:
        raise WeightsError(f"{path}: the VAE has {vae.config.latent_channels} latent channels; SD2.x needs 4.")


def load_diffusers_folder(path: str, prediction_type: str | None = None) -> BaseModels:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    for sub in ("unet", "vae"):
        cfg = os.path.join(path, sub, "config.json")
        if not os.path.isfile(cfg):
            raise MissingModelError(
                f"{path} is not a diffusers model folder: {cfg} is missing (expected unet/ and vae/ subfolders)."
            )
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
    except (OSError, ValueError, RuntimeError, EnvironmentError) as err:
        raise WeightsError(f"Cannot load the diffusers model in {path}: {err}") from None
    _check_diffusers_arch(unet, vae, path)
    pred = prediction_type
    sched_cfg = os.path.join(path, "scheduler", "scheduler_config.json")
    if pred is None and os.path.isfile(sched_cfg):
        with open(sched_cfg) as f:
            pred = json.load(f).get("prediction_type")
    loader = None
    if os.path.isdir(os.path.join(path, "text_encoder")) and os.path.isdir(os.path.join(path, "tokenizer")):
        def loader(path=path):
            from transformers import CLIPTextModel, CLIPTokenizer

            tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
            enc = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
            return tok, enc.eval()
    return BaseModels(unet.eval(), vae.eval(), pred or "epsilon", "sd2", path, text_encoder_loader=loader)


def load_base(path: str | os.PathLike, prediction_type: str | None = None) -> BaseModels:
    """Load an SD2.x base from a diffusers folder or a single ``.safetensors``/``.ckpt`` file (CPU, fp32)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingModelError(
            f"Base model not found: {path}. Give a diffusers folder or an SD2.x single file such as "
            "sd_turbo.safetensors (ComfyUI keeps them in models/checkpoints)."
        )
    if os.path.isdir(path):
        base = load_diffusers_folder(path, prediction_type)
    elif path.lower().endswith(SINGLE_FILE_SUFFIXES):
        base = load_single_file(path, prediction_type)
    else:
        raise WeightsError(f"Unsupported base model file {path}; use .safetensors or .ckpt, or a diffusers folder.")
    if base.prediction_type not in ("epsilon", "v_prediction"):
        raise WeightsError(f"Unsupported prediction type {base.prediction_type!r} in {path}.")
    return base


@torch.no_grad()
def widen_conv_in(unet, in_channels: int = 9) -> None:
    """Give the UNet's ``conv_in`` extra input channels, zero-initialised so the old behaviour is unchanged."""
    old = unet.conv_in
    if old.in_channels == in_channels:
        return
    if old.in_channels > in_channels:
        raise WeightsError(f"The UNet already has {old.in_channels} input channels (> {in_channels}).")
    new = torch.nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                          device=old.weight.device, dtype=old.weight.dtype)
    new.weight.zero_()
    new.weight[:, : old.in_channels] = old.weight
    new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)
