"""``build_model``: the one way a ``HeadsUpModel`` is made from files (pipeline, trainer, bench)."""
from __future__ import annotations

import logging
from typing import Any

import torch

from .. import devices
from ..licences import describe_licence
from ..model import HeadsUpModel
from ..precision import compute_dtypes, dtype_name, storage_dtypes
from .base import base_param_count, load_models, open_base
from .dtypes import apply_storage
from .surgery import widen_conv_in
from .text_encoder import PromptEncoder, osediff_prompt
from .weights import apply_weights, base_warnings, load_weights

log = logging.getLogger("headsup")


def build_model(base, weights=None, device=None, dtype=None, *, prediction_type: str | None = None,
                sample_latent: bool = False, configs: dict | None = None,
                weight_dtype: str | None = "auto", compute_device=None) -> tuple[HeadsUpModel, dict[str, Any]]:
    """Load the SD2.x ``base`` (diffusers folder or single file), apply HeadsUp/OSEDiff ``weights`` (LoRA merged,
    conv_in widened), and set OSEDiff's conditioning: the embedding stored in the weights, else the base's text
    encoder on ``", ,"``. ``configs`` overrides the shipped SD2 configs for single files
    (``{"unet", "vae", "text_encoder"}``), e.g. for the models ``make-tiny`` writes.

    Each stage's weights are read straight into the dtype they are kept in (precision.py decides, dtypes.py
    applies): ``dtype`` names the compute dtype (default: per device and stage), ``weight_dtype`` the storage (``auto``: the
    compute dtype, or fp16 on a CPU whose memory budget is short).

    Returns the model (eval, no grad, on ``device``) and an info dict: ``base``, ``weights``, ``base_key``,
    ``base_layout``, ``base_fingerprint``, ``dtypes`` (compute and storage per stage) and ``text_encoder_loader``
    (None without one).
    """
    dev = devices.pick_device(device)
    # Precision follows the device that computes, not the one that holds the weights (a host may build on its
    # offload device, the CPU, for a GPU run).
    run = torch.device(compute_device) if compute_device is not None else dev
    compute = compute_dtypes(run, dtype)
    storage = storage_dtypes(run, compute, weight_dtype, 4 * base_param_count(base))
    base_models = open_base(base, prediction_type, configs=configs)  # headers only: wrong files fail here
    pred, timestep, embeds, meta, loaded = base_models.prediction_type, 999, None, {}, None
    if weights is not None:
        loaded = load_weights(weights)
        for warning in base_warnings(base_models, loaded):
            log.warning("HeadsUp: %s", warning)
        meta, embeds, timestep = dict(loaded.metadata), loaded.prompt_embeds, loaded.timestep
        if loaded.kind == "headsup" and prediction_type is None:
            pred = meta.get("prediction_type", pred)
    for path in (base, weights):
        if path is not None:
            note = describe_licence(str(path))
            if note:
                log.info(note)
    loader = base_models.text_encoder_loader
    if embeds is None and loader is not None:
        # Before the UNet is read: the text encoder (1.4 GB for SD2) and the UNet are never in memory together.
        embeds = PromptEncoder(loader, base_models.cache_key).encode(osediff_prompt())
    load_models(base_models, storage)
    if loaded is not None:
        apply_weights(base_models.unet, base_models.vae, loaded)
    else:
        widen_conv_in(base_models.unet)
        log.warning("No HeadsUp weights given: running the bare base model (output is not super-resolved "
                    "meaningfully; use this only for install checks).")
    if embeds is None:
        log.warning(
            "HeadsUp: WARNING: no text conditioning. The weights store no prompt embedding and the base %s "
            "has no text encoder, so the UNet gets an all-zero embedding, which OSEDiff never saw (every "
            "cross-attention layer then outputs a constant). Fix: use a base file that contains its text "
            "encoder (e.g. v2-1_512-ema-pruned.safetensors), or store the embedding once with "
            "`headsup convert-osediff IN.pkl -o OUT.safetensors --base <SD2.1-base file>`.", base)
    model = HeadsUpModel(base_models.vae, base_models.unet, pred, timestep, embeds, sample_latent, meta)
    model.requires_grad_(False).eval()
    model.to(device=dev)
    vae = base_models.vae
    parts = {"unet": [model.unet], "encoder": [vae.encoder, getattr(vae, "quant_conv", None)],
             "decoder": [vae.decoder, getattr(vae, "post_quant_conv", None)]}
    for stage, modules in parts.items():
        for module in filter(None, modules):  # the weights' own tensors (e.g. a widened conv_in) follow too
            apply_storage(module, storage[stage], compute[stage])
    info = {"base": str(base), "weights": str(weights), "base_key": base_models.cache_key,
            "base_layout": base_models.layout, "base_fingerprint": base_models.fingerprint,
            "text_encoder_loader": loader,
            "dtypes": {s: {"compute": dtype_name(compute[s]), "storage": dtype_name(storage[s])} for s in compute}}
    return model, info
