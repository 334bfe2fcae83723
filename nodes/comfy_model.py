"""HeadsUp on the graph's own MODEL / VAE / CLIP: ComfyUI patches and a model with HeadsUpModel's interface.

``patch_models`` turns HeadsUp (or OSEDiff) weights into ModelPatcher patches:
  * UNet LoRA -> LoRA patches on a clone of MODEL (ComfyUI's own LoRA maths, ``comfy.lora.load_lora``);
  * the full ``conv_in`` -> a ``("diff", (conv_in, {"pad_weight": True}))`` patch with strength_model 0 that
    replaces and widens it from 4 to 9 input channels (the padding is what ComfyUI uses for inpaint patches);
  * VAE-encoder LoRA -> LoRA patches on a clone of the VAE's own patcher, used through a shallow copy of the
    VAE object. The graph's MODEL and VAE are never patched in place; ComfyUI swaps the weights back when one
    of them is loaded again.

``ComfyHeadsUpModel`` implements the core's ``headsup_core.backend.Backend`` (encode / predict_x0 / decode,
pixel_multiple, compute_dtype, fp32_retry, in_channels, cross_attention_dim, device, dtype, ...), so the
planner, tiler, faces and colour fix are the core's. The one step is one ``BaseModel.apply_model`` call at the sigma of the
HeadsUp timestep on x = z / sqrt(alpha_bar): ComfyUI's ``denoised`` is then OSEDiff's x0, for eps and v models
alike, and the call gets the host's dtype, attention, lowvram/partial loading and any dynamic VRAM. Large
images run the VAE as exact lockstep tiles on ComfyUI's own VAE modules (headsup_core/tiled_vae_ldm.py), as the
HeadsUpLoader path does on diffusers' (whole-image GroupNorm statistics, global mid-block attention).
"""
from __future__ import annotations

import copy
import logging

import torch
from headsup_core.tiled_vae import supports_exact

log = logging.getLogger("HeadsUp")

LDM_CONV_IN = "diffusion_model.input_blocks.0.0."
DEFAULT_PROMPT = ", ,"  # OSEDiff's prompt with no tags and no user prompt (DESIGN §1)


class WeightsMismatch(Exception):
    pass


def _lora_dict(state: dict, groups: dict, alpha: float) -> tuple[dict, list[str]]:
    """peft names (``<module>.lora_A.<adapter>.weight``) -> ComfyUI's diffusers-style LoRA dict
    (``<module>.lora_A.weight``, ``<module>.alpha``) and the list of module names."""
    adapter_of = {m: a for a, mods in groups.items() for m in mods}
    out, modules = {}, []
    for module, adapter in adapter_of.items():
        a = state.get(f"{module}.lora_A.{adapter}.weight")
        b = state.get(f"{module}.lora_B.{adapter}.weight")
        if a is None or b is None:
            raise WeightsMismatch(f"LoRA tensors of {module} ({adapter}) are missing")
        out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = a, b
        out[f"{module}.alpha"] = torch.tensor(float(alpha))
        modules.append(module)
    return out, modules


def _patches(lora_sd: dict, modules: list[str], key_map: dict[str, str], what: str) -> dict:
    import comfy.lora

    unmapped = [m for m in modules if m not in key_map]
    if unmapped:
        raise WeightsMismatch(f"{len(unmapped)} {what} LoRA layers have no counterpart in the graph's model "
                              f"(e.g. {unmapped[:2]})")
    patches = comfy.lora.load_lora(lora_sd, {m: key_map[m] for m in modules}, log_missing=False)
    if len(patches) != len(modules):
        raise WeightsMismatch(f"only {len(patches)} of {len(modules)} {what} LoRA layers could be read")
    return patches


def unet_key_map(model_patcher) -> dict[str, str]:
    """diffusers UNet module name -> the ComfyUI state-dict key of its weight."""
    import comfy.utils

    cfg = model_patcher.model.model_config.unet_config
    return {k[:-len(".weight")]: "diffusion_model." + v
            for k, v in comfy.utils.unet_to_diffusers(cfg).items() if k.endswith(".weight")}


def vae_key_map(vae_sd_keys) -> dict[str, str]:
    """diffusers VAE module name -> the ComfyUI (LDM) key, through ComfyUI's own diffusers converter."""
    from comfy.diffusers_convert import convert_vae_state_dict

    own = set(vae_sd_keys)
    out = {}
    for name in _diffusers_vae_names():
        converted = convert_vae_state_dict({name + ".weight": torch.zeros(1, 1)})
        (ldm_key,) = converted.keys()
        if ldm_key in own:
            out[name] = ldm_key
    return out


def _diffusers_vae_names() -> list[str]:
    """Every weight-bearing module name of SD's VAE encoder in diffusers naming (what HeadsUp LoRA targets)."""
    names = ["encoder.conv_in", "encoder.conv_out", "quant_conv"]
    for i in range(4):
        for j in range(2):
            for conv in ("conv1", "conv2", "conv_shortcut"):
                names.append(f"encoder.down_blocks.{i}.resnets.{j}.{conv}")
        names.append(f"encoder.down_blocks.{i}.downsamplers.0.conv")
    for j in range(2):
        for conv in ("conv1", "conv2", "conv_shortcut"):
            names.append(f"encoder.mid_block.resnets.{j}.{conv}")
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        names.append(f"encoder.mid_block.attentions.0.{proj}")
    return names


def conv_in_patches(model_patcher, unet_state: dict) -> dict:
    """The full (widened) conv_in of the weights, as padding diff patches that REPLACE the graph's conv_in.

    Added with ``strength_model=0`` (see ``patch_models``): ComfyUI zeroes the current weight, pads it to the
    9-channel shape and adds the full tensor, so the result is the checkpoint's conv_in exactly, whatever
    another clone of the same model has patched into the shared weights at the moment."""
    sd = model_patcher.model_state_dict(LDM_CONV_IN)
    base_w = sd[LDM_CONV_IN + "weight"]
    base_in = int(model_patcher.model.model_config.unet_config.get("in_channels", 4))
    weight, bias = conv_in_of(unet_state)
    if weight is None:
        return {}
    if weight.shape[0] != base_w.shape[0] or weight.shape[2:] != base_w.shape[2:] or weight.shape[1] < base_in:
        raise WeightsMismatch(f"conv_in has shape {tuple(weight.shape)}, the graph's model "
                              f"{(base_w.shape[0], base_in) + tuple(base_w.shape[2:])}")
    patches = {LDM_CONV_IN + "weight": ("diff", (weight.float(), {"pad_weight": True}))}
    if bias is not None:
        patches[LDM_CONV_IN + "bias"] = ("diff", (bias.float(), {"pad_weight": False}))
    return patches


def conv_in_of(unet_state: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The weights' full conv_in (weight, bias); an OSEDiff .pkl's LoRA on conv_in merged. (None, None): none."""
    from headsup_core.loading.weights import full_conv_in

    return full_conv_in(unet_state)


def patch_models(model, vae, weights):
    """(MODEL clone, VAE copy) with the HeadsUp weights as patches; ``weights`` is a core LoadedWeights."""
    unet_state = {k: v for k, v in weights.unet_state.items() if not k.startswith("conv_in.")}
    groups = {a: [m for m in mods if m != "conv_in"] for a, mods in weights.unet_groups.items()}
    lora_sd, modules = _lora_dict(unet_state, groups, weights.alpha_unet)
    unet_patches = _patches(lora_sd, modules, unet_key_map(model), "UNet")
    m = model.clone()
    m.add_patches(unet_patches, 1.0)
    m.add_patches(conv_in_patches(model, weights.unet_state), 1.0, 0.0)  # replaces conv_in (see there)

    vae_copy = copy.copy(vae)
    vae_copy.patcher = vae.patcher.clone()
    vae_sd = weights.vae_state
    if vae_sd:
        lora_sd, modules = _lora_dict(vae_sd, weights.vae_groups, weights.alpha_vae)
        patches = _patches(lora_sd, modules, vae_key_map(vae.patcher.model_state_dict().keys()), "VAE")
        vae_copy.patcher.add_patches(patches, 1.0)
    return m, vae_copy


def encode_default_prompt(clip, text: str = DEFAULT_PROMPT) -> torch.Tensor:
    tokens = clip.tokenize(text)
    cond = clip.encode_from_tokens(tokens)
    return cond.float().cpu()


class ComfyHeadsUpModel:
    """The core's ``Backend`` on a patched ComfyUI MODEL and VAE (see the module docstring)."""

    sample_latent = False
    # ComfyUI reserves memory for an exact tiled VAE stage as for its own VAE on a tile of this many latents
    # (its default VAE tile, 512 px): the lockstep keeps one tile's working set on the device at a time.
    EXACT_RESERVE_TILE = 64

    def __init__(self, model_patcher, vae, in_channels: int, prompt_embeds: torch.Tensor | None,
                 timestep: int = 999, metadata: dict | None = None, conditioning: dict | None = None):
        import comfy.model_management as mm

        wide = int(in_channels) > 4
        # which of the reference / mask inputs the weights react to (core model.conditioning_in_use)
        self.conditioning_in_use = dict(conditioning) if conditioning is not None else {"reference": wide,
                                                                                         "mask": wide}
        self.patcher = model_patcher
        self.vae_obj = vae
        self._in_channels = int(in_channels)
        self.timestep = int(timestep)
        self.metadata = dict(metadata or {})
        base = model_patcher.model
        self.scaling_factor = float(base.latent_format.scale_factor)
        self.vae_scale = int(vae.downscale_ratio) if isinstance(vae.downscale_ratio, int) else 8
        levels = len(base.model_config.unet_config.get("channel_mult", (1, 2, 4, 4)))
        self.pixel_multiple = self.vae_scale * 2 ** (levels - 1)
        self._context_dim = int(base.model_config.unet_config.get("context_dim") or 1024)
        if prompt_embeds is None:
            log.warning("HeadsUp: no CLIP, no stored prompt embedding and no conditioning: using a zero prompt.")
            prompt_embeds = torch.zeros(1, 77, self._context_dim)
        self.default_prompt_embeds = prompt_embeds.float().reshape(1, *prompt_embeds.shape[-2:])
        self._device = mm.get_torch_device()
        self._fast_vae_logged = False

    # -------------------------------------------------------------------- what the pipeline reads
    @property
    def vae(self):
        return self.vae_obj.first_stage_model  # its .encoder/.decoder GroupNorms get the tiler's shared stats

    @property
    def unet(self):
        return self.patcher.model.diffusion_model

    @property
    def in_channels(self) -> int:
        return self._in_channels

    @property
    def cross_attention_dim(self) -> int:
        return self._context_dim

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        base = self.patcher.model
        return base.manual_cast_dtype or base.get_dtype()

    @property
    def vae_dtype(self) -> torch.dtype:
        return self.vae_obj.vae_dtype

    @property
    def supports_exact_vae(self) -> bool:
        """ComfyUI's own SD VAE modules run as exact lockstep tiles (tiled_vae_ldm.py) when they compute where
        the engine puts the tiles; any other VAE gets blended ("fast") tiles, said once per model."""
        vae_device, here = torch.device(getattr(self.vae_obj, "device", self._device)), torch.device(self._device)
        same_device = vae_device.type == here.type and None in (vae_device.index, here.index) or vae_device == here
        if supports_exact(self.vae) and same_device:
            return True
        if not self._fast_vae_logged:
            self._fast_vae_logged = True
            log.info("HeadsUp: the graph's VAE (%s on %s) cannot run as exact tiles here; large images use blended "
                     "(fast) VAE tiles.", type(self.vae).__name__, vae_device)
        return False

    def compute_dtype(self, stage: str) -> torch.dtype:
        return self.dtype if stage == "unet" else self.vae_dtype

    def fp32_retry(self, stage: str, fn, what: str = "this tile"):
        """``fn`` itself: the host owns precision (its dtype / manual cast). A VAE stage called without a tensor
        (the exact lockstep tiles, which run the VAE's modules directly) first has ComfyUI load the VAE with its
        patches, as ``encode`` / ``decode`` do for themselves."""
        if stage == "unet":
            return fn

        def run(*args, **kwargs):
            if not args:
                side, px = self.EXACT_RESERVE_TILE, self.EXACT_RESERVE_TILE * self.vae_scale
                self._load_vae((1, 4, side, side) if stage == "decoder" else (1, 3, px, px), decode=stage == "decoder")
            return fn(*args, **kwargs)
        return run

    def latent_from_moments(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mean = moments.float().chunk(2, dim=1)[0]  # the posterior's mode, as ComfyUI's VAE encode returns it
        return mean * self.scaling_factor

    # -------------------------------------------------------------------- the three stages
    def _load_vae(self, shape, decode: bool):
        import comfy.model_management as mm

        v = self.vae_obj
        need = v.memory_used_decode(shape, v.vae_dtype) if decode else v.memory_used_encode(shape, v.vae_dtype)
        mm.load_models_gpu([v.patcher], memory_required=need, force_full_load=v.disable_offload)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Image in [-1, 1] (BxCxHxW) -> scaled latent, through the (LoRA-patched) host VAE encoder."""
        self._load_vae(x.shape, decode=False)
        v = self.vae_obj
        z = v.first_stage_model.encode(x.to(device=v.device, dtype=v.vae_dtype)).float()
        return z.to(self._device) * self.scaling_factor

    def predict_x0(self, unet_input: torch.Tensor, lq_latent: torch.Tensor, prompt_embeds: torch.Tensor,
                   strength: float = 1.0) -> torch.Tensor:
        import comfy.model_management as mm

        base = self.patcher.model
        b = unet_input.shape[0]
        mm.load_models_gpu([self.patcher], memory_required=base.memory_required(unet_input.shape))
        ms = base.model_sampling
        sigma = ms.sigma(torch.tensor([float(self.timestep)])).to(self._device)
        a = 1.0 / (1.0 + sigma.double() ** 2)  # alpha_bar of that sigma
        z = lq_latent.float().to(self._device)
        x = (z.double() / a.sqrt().view(-1, 1, 1, 1)).float()
        extra = unet_input[:, z.shape[1]:].to(self._device) if unet_input.shape[1] > z.shape[1] else None
        embeds = prompt_embeds.to(self._device)
        if embeds.shape[0] != b:
            embeds = embeds[:1].expand(b, -1, -1)
        opts = self.patcher.model_options.get("transformer_options", {})
        x0 = base.apply_model(x, sigma.expand(b), c_concat=extra, c_crossattn=embeds,
                              transformer_options=copy.copy(opts)).float()
        if strength != 1.0:
            x0 = z + strength * (x0 - z)
        return x0

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> image in [-1, 1], through the host VAE decoder (never patched)."""
        self._load_vae(latent.shape, decode=True)
        v = self.vae_obj
        y = v.first_stage_model.decode((latent.float() / self.scaling_factor).to(device=v.device, dtype=v.vae_dtype))
        return y.float().to(self._device).clamp(-1, 1)
