"""Loading the SD2.x base (UNet + VAE) offline, from a diffusers folder or one single-file checkpoint, each stage
straight into its dtype.

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

from .. import devices
from ..errors import MissingModelError, WeightsError
from .stream import SingleFile
from .text_encoder import (TEXT_PREFIXES, check_text_tower, quiet_transformers, sd2_tokenizer, single_file_text_loader,
                           text_config, text_layout)
from .folder import component_files, component_header, read_component
from .weight_files import check_present

log = logging.getLogger("headsup")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
LDM_UNET = "model.diffusion_model."
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
TINY_CONFIG_KEY = "headsup_base_config"  # metadata key with diffusers configs, written by `make-tiny` only


@dataclass
class BaseModels:
    """An SD2.x base. ``open_base`` fills everything but ``unet`` and ``vae`` from headers and configs alone;
    ``load_models`` reads those two (``read``, private, does it)."""
    unet: Any
    vae: Any
    prediction_type: str  # "epsilon" | "v_prediction"
    arch: str  # e.g. "sd2"
    source: str
    text_encoder_loader: Callable[[], tuple[Any, Any]] | None = None  # -> (tokenizer, text_encoder)
    extra: dict = field(default_factory=dict)
    layout: str = "diffusers"  # single files: "ldm" (v2-1) or "sgm" (SD-Turbo); "none" without a text encoder
    fingerprint: str = ""
    read: Callable[[dict], tuple[Any, Any]] | None = field(default=None, repr=False)  # dtypes -> (unet, vae)

    @property
    def cache_key(self) -> str:
        """Identifies the base for the prompt-embedding cache (weights fingerprint + source)."""
        return f"{self.fingerprint}:{self.source}"


# UNet tensors that no LoRA target and no conv_in widening touches: they identify the base model even after
# adapters were added (peft keeps base weights), so trained checkpoints can record what they were trained on.
FINGERPRINT_KEYS = ("time_embedding.linear_1.weight", "time_embedding.linear_2.weight", "conv_norm_out.weight",
                    "conv_norm_out.bias", "mid_block.resnets.0.norm1.weight")


# The same tensors under their LDM single-file names, so a base is fingerprinted from its file before loading.
LDM_FINGERPRINT_KEYS = dict(zip(FINGERPRINT_KEYS, (f"{LDM_UNET}time_embed.0.weight", f"{LDM_UNET}time_embed.2.weight",
                                                   f"{LDM_UNET}out.0.weight", f"{LDM_UNET}out.0.bias",
                                                   f"{LDM_UNET}middle_block.0.in_layers.0.weight")))


def fingerprint_of(tensors: dict[str, torch.Tensor]) -> str:
    """A short hash of the FINGERPRINT_KEYS tensors (diffusers names), rounded to fp16 so that fp16 and fp32 copies
    of one model agree."""
    import hashlib

    h = hashlib.sha256()
    for key in FINGERPRINT_KEYS:
        t = tensors.get(key)
        if t is None:
            continue
        h.update(key.encode())
        h.update(t.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def base_fingerprint(unet) -> str:
    """The fingerprint of a loaded base UNet (equal to the one ``open_base`` reads from its file)."""
    return fingerprint_of(dict(unet.named_parameters()))


def identify_architecture(sd: dict[str, torch.Tensor]) -> str:
    """Name the model family of an LDM/sgm-layout state dict: sd2, sd1, sdxl, flux, sd3, or unknown.

    Told from tensor names and shapes only (never the file name). SD2 comes in two layouts (see
    ``identify_layout``); sgm's ``conditioner.embedders.0`` alone is SD-Turbo, not SDXL (SDXL has two
    embedders and ``label_emb``).
    """
    keys = sd.keys()
    if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys):
        return "flux"
    if any("joint_blocks." in k for k in keys):
        return "sd3"
    if f"{LDM_UNET}label_emb.0.0.weight" in sd or any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    proj_in = sd.get(f"{LDM_UNET}input_blocks.1.1.proj_in.weight")
    if proj_in is None:  # small variants put their first attention deeper
        proj_in = next((v for k, v in sd.items() if k.startswith(LDM_UNET) and k.endswith(".proj_in.weight")), None)
    if proj_in is not None:
        return "sd2" if proj_in.ndim == 2 else "sd1"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"  # CLIP-L in transformers layout is SD1.x's text encoder
    if f"{LDM_UNET}input_blocks.0.0.weight" in sd:
        return "unknown-unet"
    return "unknown"


def is_sd2_file(path: str | os.PathLike) -> bool:
    """Whether a single file holds an SD2.x model, told from its header alone; False for a file that cannot be read
    (front ends list the SD2 files of a folder with this)."""
    try:
        return identify_architecture(SingleFile(path).header) == "sd2"
    except WeightsError:
        return False


def identify_layout(sd: dict[str, torch.Tensor]) -> str:
    """Where an SD2 single file keeps its text encoder: 'ldm' (cond_stage_model.model.*: v2-1 512/768),
    'sgm' (conditioner.embedders.0.model.*: SD-Turbo), or 'none'."""
    return text_layout(sd.keys()) or "none"


def _found(sd: dict) -> str:
    """A short description of what a state dict holds, for refusals."""
    keys = sd.keys()
    parts = []
    emb = sorted({k.split(".")[2] for k in keys if k.startswith("conditioner.embedders.")})
    if emb:
        parts.append(f"{len(emb)} text embedder(s) under conditioner.embedders.{{{','.join(emb)}}}")
    if f"{LDM_UNET}label_emb.0.0.weight" in sd:
        parts.append("a UNet label_emb")
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        parts.append("a CLIP-L text encoder (cond_stage_model.transformer.*)")
    proj = next((v for k, v in sd.items() if k.startswith(LDM_UNET) and k.endswith(".proj_in.weight")), None)
    if proj is not None and proj.ndim == 4:
        parts.append("convolutional transformer projections")
    if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys):
        parts.append("double_blocks (Flux)")
    if any("joint_blocks." in k for k in keys):
        parts.append("joint_blocks (MMDiT)")
    return "; found " + ", ".join(parts) if parts else ""


def _wrong_arch_error(path: str, found: str, sd: dict | None = None) -> WeightsError:
    names = {"sd1": "Stable Diffusion 1.x", "sdxl": "SDXL", "flux": "Flux", "sd3": "SD3",
             "unknown-unet": "an unrecognised UNet", "unknown": "no Stable Diffusion UNet at all"}
    return WeightsError(
        f"{path} is {names.get(found, found)}{_found(sd or {})}, but HeadsUp needs a Stable Diffusion 2.x base "
        "(SD2.1-base, e.g. v2-1_512-ema-pruned.safetensors)."
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
    model.load_state_dict(state, strict=True, assign=True)  # tensors keep the dtype they were read in
    return model.eval()


def _check_shapes(model: torch.nn.Module, state: dict, what: str, path: str) -> None:
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise WeightsError(
                f"{path}: the {what} tensor {key} has shape {tuple(value.shape)} but SD2.x needs "
                f"{tuple(own[key].shape)}; this is not an SD2.x-architecture checkpoint."
            )


def open_single_file(path: str, prediction_type: str | None = None, configs: dict | None = None) -> BaseModels:
    """An SD2.x single file (LDM or sgm layout), identified from its header (names, shapes): prediction type,
    text-encoder loader and fingerprint, with no UNet or VAE read yet. ``configs`` overrides the shipped SD2
    configs (``{"unet": ..., "vae": ..., "text_encoder": ...}``), for smaller models of the same layout such as
    the ones ``make-tiny`` writes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    check_present(path)
    src = SingleFile(path)
    header, meta = src.header, src.metadata
    arch = identify_architecture(header)
    if arch != "sd2":
        raise _wrong_arch_error(path, arch, header)
    if configs is None and TINY_CONFIG_KEY in meta:
        configs = json.loads(meta[TINY_CONFIG_KEY])
    configs = dict(configs or {})
    unet_cfg = configs.get("unet") or UNet2DConditionModel.load_config(CONFIG_DIR / "sd2" / "unet")
    vae_cfg = configs.get("vae") or AutoencoderKL.load_config(CONFIG_DIR / "sd2" / "vae")
    if not any(k.startswith("first_stage_model.") for k in header):
        raise WeightsError(f"{path} has a UNet but no VAE (first_stage_model.*); use a full SD2.x checkpoint.")
    layout = identify_layout(header)
    loader = None
    if layout != "none":
        check_text_tower(header, TEXT_PREFIXES[layout], text_config(configs.get("text_encoder")), path)
        kept = None if src.safetensors else src.read(src.keys_with_prefix(TEXT_PREFIXES[layout]))
        loader = single_file_text_loader(path, layout, kept, configs.get("text_encoder"))
    pred = prediction_type or meta.get("prediction_type") or guess_prediction_type(
        src.read(src.keys_with_prefix(f"{LDM_UNET}output_blocks.11.1.transformer_blocks.0.norm1.bias")))
    ldm = src.read([k for k in LDM_FINGERPRINT_KEYS.values() if k in header])
    fingerprint = fingerprint_of({k: ldm[v] for k, v in LDM_FINGERPRINT_KEYS.items() if v in ldm})

    def read(want: dict) -> tuple[Any, Any]:
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

        def vae_rule(key: str, _stored: torch.dtype) -> torch.dtype:
            part = key[len("first_stage_model."):].split(".", 1)[0]
            return want["decoder"] if part in ("decoder", "post_quant_conv") else want["encoder"]

        # diffusers' own key conversion, on the UNet's tensors only (EMA copies and the text tower are never read)
        unet_sd = convert_ldm_unet_checkpoint(src.read(src.keys_with_prefix(LDM_UNET), lambda k, d: want["unet"]),
                                              dict(unet_cfg))
        unet = _build(UNet2DConditionModel, unet_cfg, unet_sd, "UNet", path)
        del unet_sd
        vae_sd = convert_ldm_vae_checkpoint(src.read(src.keys_with_prefix("first_stage_model."), vae_rule),
                                            dict(vae_cfg))
        vae = _build(AutoencoderKL, vae_cfg, vae_sd, "VAE", path)
        src.close()
        return unet, vae

    return BaseModels(None, None, pred, "sd2", path, text_encoder_loader=loader, layout=layout,
                      fingerprint=fingerprint, read=read)


def _check_diffusers_arch(unet_cfg: dict, vae_cfg: dict, path: str) -> None:
    if unet_cfg.get("addition_embed_type") == "text_time":
        raise _wrong_arch_error(path, "sdxl")
    if not unet_cfg.get("use_linear_projection", False):
        raise _wrong_arch_error(path, "sd1")
    if vae_cfg.get("latent_channels", 4) != 4:
        raise WeightsError(f"{path}: the VAE has {vae_cfg['latent_channels']} latent channels; SD2.x needs 4.")


def _folder_text_loader(path: str) -> Callable[[], tuple[Any, Any]]:
    def load():
        from transformers import CLIPTextModel, CLIPTokenizer

        with quiet_transformers():
            if os.path.isdir(os.path.join(path, "tokenizer")):
                tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
            else:
                tok = sd2_tokenizer()
            enc = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
        return tok, enc.eval()
    return load


def open_diffusers_folder(path: str, prediction_type: str | None = None) -> BaseModels:
    """A diffusers folder (``unet/``, ``vae/``, optional ``text_encoder/``, ``scheduler/``), identified from its
    configs and headers; its weights are read like a single file's (folder.py), straight into each stage's dtype."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cfgs, files = {}, {}
    for sub in ("unet", "vae"):
        cfg = os.path.join(path, sub, "config.json")
        if not os.path.isfile(cfg):
            raise MissingModelError(
                f"{path} is not a diffusers model folder: {cfg} is missing (expected unet/ and vae/ subfolders)."
            )
        try:
            cfgs[sub] = dict((UNet2DConditionModel if sub == "unet" else AutoencoderKL).load_config(
                os.path.join(path, sub), local_files_only=True))
        except (OSError, ValueError) as err:
            raise WeightsError(f"Cannot read {cfg}: {err}") from None
        files[sub] = component_files(path, sub)
        if not files[sub]:
            raise MissingModelError(f"{path}/{sub} has a config.json but no weights (diffusion_pytorch_model."
                                    "safetensors or .bin); re-download the model folder.")
    _check_diffusers_arch(cfgs["unet"], cfgs["vae"], path)
    pred = prediction_type
    sched_cfg = os.path.join(path, "scheduler", "scheduler_config.json")
    if pred is None and os.path.isfile(sched_cfg):
        with open(sched_cfg) as f:
            pred = json.load(f).get("prediction_type")
    has_text = os.path.isdir(os.path.join(path, "text_encoder"))
    fingerprint = fingerprint_of(read_component(files["unet"], keys=set(FINGERPRINT_KEYS)))

    def read(want: dict) -> tuple[Any, Any]:
        def vae_rule(key: str, _stored: torch.dtype) -> torch.dtype:
            return want["decoder"] if key.startswith(("decoder.", "post_quant_conv.")) else want["encoder"]

        try:
            unet = _build(UNet2DConditionModel, cfgs["unet"], read_component(files["unet"], lambda k, d: want["unet"]),
                          "UNet", path)
            vae = _build(AutoencoderKL, cfgs["vae"], read_component(files["vae"], vae_rule), "VAE", path)
        except WeightsError as err:  # e.g. a folder from before diffusers renamed the VAE attention tensors
            log.info("HeadsUp: %s Reading it with diffusers' from_pretrained instead.", err)
            return _from_pretrained(path, want)
        return unet, vae

    return BaseModels(None, None, pred or "epsilon", "sd2", path,
                      text_encoder_loader=_folder_text_loader(path) if has_text else None,
                      layout="diffusers" if has_text else "none", fingerprint=fingerprint, read=read)


def _from_pretrained(path: str, want: dict) -> tuple[Any, Any]:
    """diffusers' own folder loading (it converts old tensor names); peaks at the stored and the cast copy."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True,
                                                    torch_dtype=want["unet"])
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True, torch_dtype=want["encoder"])
    except (OSError, ValueError, RuntimeError, EnvironmentError) as err:
        raise WeightsError(f"Cannot load the diffusers model in {path}: {err}") from None
    for part in (vae.decoder, getattr(vae, "post_quant_conv", None)):
        if part is not None:
            part.to(want["decoder"])
    return unet.eval(), vae.eval()


def base_param_count(path: str | os.PathLike) -> int:
    """Parameters of the base's UNet and VAE, from file headers only (0 when unknown); for the storage policy."""
    path = os.fspath(path)
    try:
        if os.path.isdir(path):
            files = [f for sub in ("unet", "vae") for f in component_files(path, sub) if f.endswith(".safetensors")]
            return sum(t.numel() for t in component_header(files).values())
        if path.endswith(".safetensors") and os.path.isfile(path):
            header = SingleFile(path).header
            return sum(t.numel() for k, t in header.items() if k.startswith((LDM_UNET, "first_stage_model.")))
    except WeightsError:
        return 0  # load_base says what is wrong with the file
    return 0


def open_base(path: str | os.PathLike, prediction_type: str | None = None, configs: dict | None = None) -> BaseModels:
    """Identify an SD2.x base (a diffusers folder or a single ``.safetensors``/``.ckpt`` file) from its headers and
    configs: everything but the UNet and VAE, which ``load_models`` reads. Wrong files are refused here, before any
    large read. ``configs`` (single files only) overrides the shipped SD2 configs: ``{"unet", "vae",
    "text_encoder"}``."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingModelError(
            f"Base model not found: {path}. Give a diffusers folder or an SD2.x single file such as "
            "v2-1_512-ema-pruned.safetensors (ComfyUI keeps them in models/checkpoints)."
        )
    if os.path.isdir(path):
        base = open_diffusers_folder(path, prediction_type)
    elif path.lower().endswith(SINGLE_FILE_SUFFIXES):
        base = open_single_file(path, prediction_type, configs)
    else:
        raise WeightsError(f"Unsupported base model file {path}; use .safetensors or .ckpt, or a diffusers folder.")
    if base.prediction_type not in ("epsilon", "v_prediction"):
        raise WeightsError(f"Unsupported prediction type {base.prediction_type!r} in {path}.")
    return base


def load_models(base: BaseModels, dtypes: dict | None = None) -> BaseModels:
    """Read ``base``'s UNet and VAE (on the CPU), each stage straight into its dtype (``{"unet", "encoder",
    "decoder"}``, default fp32): no whole-file copy and no fp32 copy on the way, for folders as for single files."""
    if base.unet is None:
        want = {"unet": torch.float32, "encoder": torch.float32, "decoder": torch.float32, **(dtypes or {})}
        base.unet, base.vae = base.read(want)
        base.read = None  # the file handles and configs are not needed again
        devices.return_freed_memory()  # the read chunks' heap pages (0.1-0.3 GB for SD2 from an fp32 folder)
    return base


def load_base(path: str | os.PathLike, prediction_type: str | None = None, configs: dict | None = None,
              dtypes: dict | None = None) -> BaseModels:
    """``open_base`` then ``load_models``: an SD2.x base with its UNet and VAE loaded on the CPU."""
    return load_models(open_base(path, prediction_type, configs), dtypes)
