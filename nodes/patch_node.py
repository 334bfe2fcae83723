"""HeadsUpPatchModel: HeadsUp on the graph's own MODEL, VAE and (optionally) CLIP.

A graph that already holds SD2.1-base adds HeadsUp without loading the base a second time: the HeadsUp
weights become ModelPatcher patches on clones (see comfy_model.py), and the result is an ordinary
HEADSUP_MODEL that HeadsUpUpscale and HeadsUpBlendUpscale take unchanged.
"""
import logging
import os
from collections import OrderedDict

from comfy_api.latest import io

from . import paths
from .loaders import HEADSUP_MODEL, HeadsUpHandle, _remember, _stamp

log = logging.getLogger("HeadsUp")

_WEIGHTS_CACHE = OrderedDict()  # file stamp -> LoadedWeights (node classes are cloned per run)


def _load_weights(path):
    from headsup_core.loading.weights import load_weights

    key = _stamp(path)
    loaded = _WEIGHTS_CACHE.get(key)
    if loaded is None:
        loaded = load_weights(path)
    _remember(_WEIGHTS_CACHE, key, loaded)
    return loaded


def build_handle(model, vae, loaded, clip=None, name="HeadsUp"):
    """MODEL + VAE (+ CLIP) from the graph and core LoadedWeights -> a HeadsUpHandle (no ComfyUI loading)."""
    from headsup_core.errors import WeightsError
    from headsup_core.licences import describe_licence
    from headsup_core.model import conditioning_in_use
    from headsup_core.pipeline import HeadsUpPipeline

    from .comfy_model import ComfyHeadsUpModel, WeightsMismatch, conv_in_of, encode_default_prompt, patch_models

    unet_cfg = model.model.model_config.unet_config
    if unet_cfg.get("context_dim") != 1024 or unet_cfg.get("in_channels", 4) != 4:
        raise WeightsError(f"HeadsUp needs a Stable Diffusion 2.x MODEL (context_dim 1024, 4 latent channels); "
                           f"the connected model has context_dim {unet_cfg.get('context_dim')} and "
                           f"{unet_cfg.get('in_channels')} input channels. Load SD2.1-base (or SD-Turbo).")
    pred = loaded.metadata.get("prediction_type", "epsilon")
    host_pred = type(model.model.model_sampling).__name__
    if (pred == "v_prediction") != ("V_PREDICTION" in host_pred.upper()):
        log.warning("HeadsUp: %s was trained with %s but the connected model samples as %s; ComfyUI's model "
                    "sampling is used.", name, pred, host_pred)
    try:
        patched_model, patched_vae = patch_models(model, vae, loaded)
    except WeightsMismatch as err:
        raise WeightsError(f"{loaded.path}: {err}; the weights were trained on a different base architecture "
                           "than the connected MODEL/VAE (HeadsUp needs SD2.x).") from None
    embeds = encode_default_prompt(clip) if clip is not None else loaded.prompt_embeds
    if embeds is not None and embeds.shape[-1] != unet_cfg["context_dim"]:
        raise WeightsError(f"The default prompt embedding is {embeds.shape[-1]} wide but the MODEL needs "
                           f"{unet_cfg['context_dim']}; connect the CLIP of the same SD2.x checkpoint.")
    note = describe_licence(str(loaded.path))
    if note:
        log.info(note)
    cm = ComfyHeadsUpModel(patched_model, patched_vae, in_channels=max(4, loaded.in_channels),
                           prompt_embeds=embeds, timestep=loaded.timestep, metadata=loaded.metadata,
                           conditioning=conditioning_in_use(conv_in_of(loaded.unet_state)[0]))
    pipe = HeadsUpPipeline(cm, None, {"base": "graph MODEL/VAE", "weights": str(loaded.path)})
    return HeadsUpHandle(pipe=pipe, patcher=None, name=name)


class HeadsUpPatchModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HeadsUpPatchModel",
            display_name="HeadsUp Patch Model (graph MODEL/VAE)",
            category="HeadsUp",
            description="HeadsUp on the SD2.x MODEL and VAE already in your graph (e.g. from Load Checkpoint): the "
                        "HeadsUp weights are applied as patches on copies, so the base is not loaded twice and "
                        "ComfyUI's memory management (lowvram, dtype, attention) applies.",
            inputs=[
                io.Model.Input("model", tooltip="An SD2.x MODEL (SD2.1-base for HeadsUp/OSEDiff weights), e.g. "
                                                "from Load Checkpoint. It is not modified; a patched copy is used."),
                io.Vae.Input("vae", tooltip="The VAE of the same checkpoint. Its encoder gets the HeadsUp LoRA on a "
                                            "copy; the graph's VAE is not modified."),
                io.Combo.Input("weights", options=paths.list_weights(),
                               tooltip="HeadsUp .safetensors or OSEDiff .pkl weights from models/headsup."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional CLIP of the same checkpoint: the default prompt (OSEDiff's ', ,') "
                                      "is encoded with it. Without it, the prompt embedding stored in the "
                                      "weights is used. A CONDITIONING on HeadsUp Upscale overrides both."),
            ],
            outputs=[HEADSUP_MODEL.Output(display_name="headsup_model",
                                          tooltip="HeadsUp on the graph's model, for HeadsUp Upscale.")],
        )

    @classmethod
    def execute(cls, model, vae, weights, clip=None) -> io.NodeOutput:
        path = paths.resolve_weights(weights)
        loaded = _load_weights(path)
        name = f"{os.path.basename(path)} on the graph's model"
        return io.NodeOutput(build_handle(model, vae, loaded, clip, name))
