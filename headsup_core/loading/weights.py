"""HeadsUp weights: the HeadsUp ``.safetensors`` format, OSEDiff ``.pkl`` files, and conversion between them.

HeadsUp checkpoint (format_version 1), one ``.safetensors`` file:
  * ``unet.<peft name>`` / ``vae.<peft name>``: LoRA tensors exactly as peft names them
    (``<module>.lora_A.<adapter>.weight``), so adapters are rebuilt with peft and loaded key for key;
  * ``unet.conv_in.weight`` / ``unet.conv_in.bias``: the full, widened (LQ ⊕ reference ⊕ mask) input conv;
  * ``prompt_embeds`` (optional): the default prompt embedding, 1x77xD, so no text encoder is needed;
  * ``__metadata__``: format, version, base architecture, ranks, alphas, targets, timestep, prediction type,
    conditioning channels, default colour fix (see ``REQUIRED_METADATA``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import MissingModelError, WeightsError
from .base import base_fingerprint
from .weight_files import read_state_dict
from .surgery import DEFAULT_LORA_ALPHA, VAE_ADAPTER

FORMAT = "headsup"
FORMAT_VERSION = 1
REQUIRED_METADATA = ("format", "format_version", "base_arch", "rank_unet", "rank_vae", "unet_lora_targets",
                     "vae_lora_targets", "timestep", "prediction_type", "in_channels", "default_color_fix")
# Names that older checkpoints record in their metadata (``lora_targets_from``), from before the modules that
# re-exported them were removed, -> where they live now. New checkpoints are written with the new names.
RENAMED_IN_METADATA = {"headsup_core.lora.add_osediff_adapters": "headsup_core.loading.surgery.add_osediff_adapters"}
OSEDIFF_KEYS = ("unet_lora_encoder_modules", "unet_lora_decoder_modules", "unet_lora_others_modules",
                "rank_unet", "state_dict_unet")


@dataclass
class LoadedWeights:
    kind: str  # "headsup" | "osediff"
    path: str
    unet_groups: dict[str, list[str]]
    vae_groups: dict[str, list[str]]
    rank_unet: int
    rank_vae: int
    alpha_unet: float
    alpha_vae: float
    unet_state: dict[str, torch.Tensor]  # peft parameter names -> tensors (LoRA + conv_in)
    vae_state: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    prompt_embeds: torch.Tensor | None = None

    @property
    def in_channels(self) -> int:
        for key in ("conv_in.weight", "conv_in.base_layer.weight"):
            if key in self.unet_state:
                return int(self.unet_state[key].shape[1])
        return 4

    @property
    def timestep(self) -> int:
        return int(self.metadata.get("timestep", 999))


def _json(meta: dict, key: str, path: str):
    try:
        return json.loads(meta[key])
    except (KeyError, ValueError) as err:
        raise WeightsError(f"{path}: metadata field {key!r} is missing or not valid JSON ({err}).") from None


def load_headsup(path: str) -> LoadedWeights:
    tensors, meta = read_state_dict(path)
    meta = {k: RENAMED_IN_METADATA.get(v, v) for k, v in meta.items()}
    if meta.get("format") != FORMAT:
        hint = ""
        if any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in tensors):
            hint = " It looks like a base Stable Diffusion checkpoint: pass it as the base model instead."
        raise WeightsError(f"{path} is not a HeadsUp checkpoint (no format=headsup metadata).{hint}")
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise WeightsError(f"{path}: HeadsUp metadata is missing {missing}; the file is damaged or from a foreign tool.")
    version = int(meta["format_version"])
    if version > FORMAT_VERSION:
        raise WeightsError(f"{path} uses HeadsUp format version {version}; this install reads up to "
                           f"{FORMAT_VERSION}. Update the HeadsUp package.")
    unet_state = {k[5:]: v for k, v in tensors.items() if k.startswith("unet.")}
    vae_state = {k[4:]: v for k, v in tensors.items() if k.startswith("vae.")}
    if "conv_in.weight" not in unet_state:
        raise WeightsError(f"{path} has no unet.conv_in.weight tensor; the checkpoint is incomplete.")
    return LoadedWeights(
        kind="headsup", path=path,
        unet_groups=_json(meta, "unet_lora_targets", path), vae_groups=_json(meta, "vae_lora_targets", path),
        rank_unet=int(meta["rank_unet"]), rank_vae=int(meta["rank_vae"]),
        alpha_unet=float(meta.get("alpha_unet", DEFAULT_LORA_ALPHA)),
        alpha_vae=float(meta.get("alpha_vae", DEFAULT_LORA_ALPHA)),
        unet_state=unet_state, vae_state=vae_state, metadata=meta, prompt_embeds=tensors.get("prompt_embeds"),
    )


def load_osediff(path: str) -> LoadedWeights:
    obj, _ = read_state_dict(path)  # torch.load(weights_only=True): the .pkl holds only dicts, lists and tensors
    missing = [k for k in OSEDIFF_KEYS if k not in obj]
    if missing:
        raise WeightsError(f"{path} is not an OSEDiff checkpoint: keys {missing} are missing.")
    unet_groups = {
        "default_encoder": list(obj["unet_lora_encoder_modules"]),
        "default_decoder": list(obj["unet_lora_decoder_modules"]),
        "default_others": list(obj["unet_lora_others_modules"]),
    }
    vae_groups = {VAE_ADAPTER: list(obj.get("vae_lora_encoder_modules", []))}
    meta = {"format": "osediff", "timestep": "999", "prediction_type": "epsilon", "default_color_fix": "adain"}
    return LoadedWeights(
        kind="osediff", path=path, unet_groups=unet_groups, vae_groups=vae_groups,
        rank_unet=int(obj["rank_unet"]), rank_vae=int(obj.get("rank_vae", 4)),
        alpha_unet=DEFAULT_LORA_ALPHA, alpha_vae=DEFAULT_LORA_ALPHA,
        unet_state=dict(obj["state_dict_unet"]), vae_state=dict(obj.get("state_dict_vae", {})), metadata=meta,
    )


def load_weights(path: str | os.PathLike) -> LoadedWeights:
    """Load a HeadsUp ``.safetensors`` or an OSEDiff ``.pkl``; the format is told from the content."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingModelError(f"HeadsUp weights file not found: {path} (ComfyUI keeps them in models/headsup).")
    if os.path.isdir(path):
        raise WeightsError(f"Expected a weights file but got a folder: {path}")
    if path.endswith(".safetensors"):
        return load_headsup(path)
    return load_osediff(path)


def load_tensors_into(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path: str) -> None:
    own = dict(module.named_parameters())
    unknown = [k for k in state if k not in own]
    if unknown:
        raise WeightsError(f"{path}: {len(unknown)} {what} tensors have no matching layer in the base model "
                           f"(e.g. {unknown[:2]}); the weights were trained on a different base architecture.")
    with torch.no_grad():
        for key, value in state.items():
            if own[key].shape != value.shape:
                raise WeightsError(f"{path}: {what} tensor {key} has shape {tuple(value.shape)} but the base needs "
                                   f"{tuple(own[key].shape)}; the weights belong to a different base model.")
            own[key].copy_(value.to(own[key].dtype))
    # Every LoRA tensor of the adapters just added must come from the file, or the adapter is half-random.
    absent = [k for k in own if "lora_" in k and k not in state]
    if absent:
        raise WeightsError(f"{path}: {len(absent)} {what} LoRA tensors are missing (e.g. {absent[:2]}).")


def apply_weights(unet, vae, weights: LoadedWeights, in_channels: int = 9) -> None:
    """Add the adapters with peft, load their tensors, merge them, then install the full ``conv_in``."""
    from .surgery import add_adapters, merge_adapters, widen_conv_in

    add_adapters(unet, weights.unet_groups, weights.rank_unet, weights.alpha_unet)
    add_adapters(vae, weights.vae_groups, weights.rank_vae, weights.alpha_vae)
    full_conv_in = {k: weights.unet_state[k] for k in ("conv_in.weight", "conv_in.bias") if k in weights.unet_state}
    lora_state = {k: v for k, v in weights.unet_state.items() if k not in full_conv_in}
    load_tensors_into(unet, lora_state, "UNet", weights.path)
    load_tensors_into(vae, weights.vae_state, "VAE", weights.path)
    merge_adapters(unet)
    merge_adapters(vae)
    widen_conv_in(unet, max(in_channels, weights.in_channels))
    if full_conv_in:
        with torch.no_grad():
            if unet.conv_in.weight.shape != full_conv_in["conv_in.weight"].shape:
                raise WeightsError(f"{weights.path}: conv_in has shape {tuple(full_conv_in['conv_in.weight'].shape)}"
                                   f" but the base UNet needs {tuple(unet.conv_in.weight.shape)}.")
            unet.conv_in.weight.copy_(full_conv_in["conv_in.weight"])
            unet.conv_in.bias.copy_(full_conv_in["conv_in.bias"])


def _merged_conv_in(unet) -> tuple[torch.Tensor, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    conv = unet.conv_in
    if isinstance(conv, LoraLayer):
        weight = conv.get_base_layer().weight.detach().clone()
        for adapter in conv.active_adapters:
            if adapter in conv.lora_A:
                weight += conv.get_delta_weight(adapter).to(weight.dtype)
        return weight, conv.get_base_layer().bias.detach().clone()
    return conv.weight.detach().clone(), conv.bias.detach().clone()


def full_conv_in(unet_state: dict,
                 alpha: float = DEFAULT_LORA_ALPHA) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The full ``conv_in`` (weight, bias) of a weights file's UNet state; an OSEDiff ``.pkl``'s conv_in LoRA is
    merged by peft. (None, None) when the state has no conv_in. The core converter and the ComfyUI patch use it."""
    if "conv_in.weight" in unet_state:
        return unet_state["conv_in.weight"], unet_state.get("conv_in.bias")
    base_w = unet_state.get("conv_in.base_layer.weight")
    if base_w is None:
        return None, None
    from peft import LoraConfig, inject_adapter_in_model

    holder = torch.nn.Module()
    holder.conv_in = torch.nn.Conv2d(base_w.shape[1], base_w.shape[0], base_w.shape[2], padding=base_w.shape[2] // 2)
    adapters = sorted({k.split(".")[2] for k in unet_state if k.startswith("conv_in.lora_A.")})
    for adapter in adapters:
        rank = int(unet_state[f"conv_in.lora_A.{adapter}.weight"].shape[0])
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["conv_in"]), holder,
                                adapter_name=adapter)
    with torch.no_grad():
        params = dict(holder.named_parameters())
        for key, value in unet_state.items():
            if key.startswith("conv_in."):
                params[key if key in params else key.replace("conv_in.", "conv_in.base_layer.")].copy_(value)
    if adapters:
        holder.conv_in.set_adapter(adapters)
    return _merged_conv_in(holder)


def _groups_from_model(model) -> dict[str, list[str]]:
    from peft.tuners.lora import LoraLayer

    groups: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and name != "conv_in":
            for adapter in module.lora_A.keys():
                groups.setdefault(adapter, []).append(name)
    return groups


def save_headsup_checkpoint(path: str | os.PathLike, unet, vae, metadata: dict | None = None,
                            prompt_embeds: torch.Tensor | None = None) -> str:
    """Write a HeadsUp checkpoint from peft-adapted (training) modules, atomically."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in unet.state_dict().items():
        if "lora_" in name and not name.startswith("conv_in."):
            tensors["unet." + name] = value
    for name, value in vae.state_dict().items():
        if "lora_" in name:
            tensors["vae." + name] = value
    tensors["unet.conv_in.weight"], tensors["unet.conv_in.bias"] = _merged_conv_in(unet)
    if prompt_embeds is not None:
        tensors["prompt_embeds"] = prompt_embeds.detach().reshape(1, *prompt_embeds.shape[-2:])
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
    ranks = {m: next((int(t.shape[0]) for k, t in tensors.items() if k.startswith(m) and ".lora_A." in k), 4)
             for m in ("unet.", "vae.")}
    meta = {
        "format": FORMAT, "format_version": str(FORMAT_VERSION), "base_arch": "sd2",
        "rank_unet": str(ranks["unet."]), "rank_vae": str(ranks["vae."]),
        "alpha_unet": str(DEFAULT_LORA_ALPHA), "alpha_vae": str(DEFAULT_LORA_ALPHA),
        "unet_lora_targets": json.dumps(_groups_from_model(unet)),
        "vae_lora_targets": json.dumps(_groups_from_model(vae)),
        "timestep": "999", "prediction_type": "epsilon", "in_channels": str(tensors["unet.conv_in.weight"].shape[1]),
        "default_color_fix": "adain",
        # Our own choices where the paper is silent (DESIGN §1 "guess"), recorded with the weights.
        "conditioning": "lq_latent+reference_latent+face_mask", "latent_mode": "mode",
        # The base it was trained on (peft keeps the base weights; these tensors carry no LoRA).
        "base_fingerprint": base_fingerprint(unet),
    }
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    _atomic_save(lambda tmp: save_file(tensors, tmp, metadata=meta), path)
    return path


def _atomic_save(write, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def convert_osediff(pkl_path: str | os.PathLike, out_path: str | os.PathLike, in_channels: int = 9,
                    prompt_embeds: torch.Tensor | None = None, base_fingerprint: str | None = None) -> str:
    """Convert an OSEDiff ``.pkl`` to a HeadsUp checkpoint (its conv_in LoRA merged, then widened with zeros).

    ``prompt_embeds`` (OSEDiff's default conditioning, the base's text encoder on ``", ,"``) is stored so later
    runs need no text encoder; ``convert_osediff_with_base`` computes it from a base file."""
    w = load_osediff(os.fspath(pkl_path))
    weight, bias = full_conv_in(w.unet_state, w.alpha_unet)
    if weight is None:
        raise WeightsError(f"{pkl_path}: state_dict_unet has no conv_in weights; the OSEDiff checkpoint is incomplete.")
    wide = torch.zeros(weight.shape[0], in_channels, *weight.shape[2:])
    wide[:, : weight.shape[1]] = weight
    tensors = {"unet." + k: v for k, v in w.unet_state.items() if "lora_" in k and not k.startswith("conv_in.")}
    tensors.update({"vae." + k: v for k, v in w.vae_state.items() if "lora_" in k})
    tensors["unet.conv_in.weight"], tensors["unet.conv_in.bias"] = wide, bias
    if prompt_embeds is not None:
        tensors["prompt_embeds"] = prompt_embeds.reshape(1, *prompt_embeds.shape[-2:])
    groups = {a: [m for m in mods if m != "conv_in"] for a, mods in w.unet_groups.items()}
    meta = {
        "format": FORMAT, "format_version": str(FORMAT_VERSION), "base_arch": "sd2",
        "rank_unet": str(w.rank_unet), "rank_vae": str(w.rank_vae),
        "alpha_unet": str(w.alpha_unet), "alpha_vae": str(w.alpha_vae),
        "unet_lora_targets": json.dumps(groups), "vae_lora_targets": json.dumps(w.vae_groups),
        "timestep": "999", "prediction_type": "epsilon", "in_channels": str(in_channels),
        "default_color_fix": "adain", "converted_from": "osediff",
        "conditioning": "lq_latent+reference_latent+face_mask (zero-initialised: OSEDiff behaviour)",
        "trained_on": "SD2.1-base (OSEDiff)",
    }
    if base_fingerprint:
        meta["base_fingerprint"] = base_fingerprint
    if prompt_embeds is not None:
        meta["prompt"] = ", ,"
    from safetensors.torch import save_file

    tensors = {k: v.detach().float().contiguous() for k, v in tensors.items()}
    out_path = os.fspath(out_path)
    _atomic_save(lambda tmp: save_file(tensors, tmp, metadata=meta), out_path)
    return out_path


def convert_osediff_with_base(pkl_path, out_path, base, in_channels: int = 9) -> str:
    """``convert_osediff`` storing the default conditioning (``base``'s text encoder on ``", ,"``) and the base's
    fingerprint, so later runs need no text encoder and warn if used on another base."""
    from .base import open_base
    from .text_encoder import PromptEncoder, osediff_prompt

    b = open_base(base)  # headers only: the text encoder and the fingerprint need no UNet
    if b.text_encoder_loader is None:
        raise WeightsError(f"{base} has no text encoder, so the default prompt embedding cannot be computed; "
                           "give an SD2.1-base file that contains one (e.g. v2-1_512-ema-pruned.safetensors).")
    for warning in base_warnings(b, load_osediff(os.fspath(pkl_path))):
        import logging

        logging.getLogger("headsup").warning("HeadsUp: %s", warning)
    embeds = PromptEncoder(b.text_encoder_loader, b.cache_key).encode(osediff_prompt())
    return convert_osediff(pkl_path, out_path, in_channels, prompt_embeds=embeds, base_fingerprint=b.fingerprint)


def base_warnings(base, weights: LoadedWeights) -> list[str]:
    """Why ``weights`` may not fit ``base`` (BaseModels): OSEDiff weights off SD2.1-base, fingerprint mismatch."""
    out = []
    recorded = weights.metadata.get("base_fingerprint")
    osediff = weights.kind == "osediff" or weights.metadata.get("converted_from") == "osediff"
    if recorded and base.fingerprint and recorded != base.fingerprint:
        out.append(f"{weights.path} was made on a base with fingerprint {recorded}, but {base.source} has "
                   f"{base.fingerprint}: the weights are applied to a different base model than they were trained "
                   "on, which is untested." + (" OSEDiff weights need SD2.1-base (v2-1_512-ema-pruned)." if osediff else ""))
    if osediff and not recorded:
        if base.layout == "sgm":
            out.append(f"{base.source} is in the sgm layout (SD-Turbo): OSEDiff's weights are LoRA deltas trained on "
                       "SD2.1-base, and SD-Turbo's UNet is fully fine-tuned, so this is an untested model. Use "
                       "v2-1_512-ema-pruned.safetensors (SD2.1-base) to get OSEDiff's results.")
        elif base.prediction_type == "v_prediction":
            out.append(f"{base.source} is a v-prediction (768-v) SD2 base: OSEDiff's weights were trained on the "
                       "epsilon-prediction SD2.1-base; use v2-1_512-ema-pruned.safetensors.")
    return out
