"""``headsup make-tiny``: tiny random models in every real on-disk format, for install checks and tests.

Nothing is downloaded. The files have the real layouts (a diffusers folder, an LDM single file that diffusers'
own converter reads, a HeadsUp checkpoint, an OSEDiff ``.pkl``, insightface-shaped ONNX packs), just with
tiny random weights, so the loading code under test is the code users run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

TINY_UNET = {
    # Attention only at the coarser level keeps a 4K tiny run cheap on a 2-core CPU.
    "block_out_channels": [16, 32], "layers_per_block": 1, "cross_attention_dim": 32,
    "attention_head_dim": [2, 4], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "in_channels": 4, "out_channels": 4,
    "sample_size": 32, "norm_num_groups": 8, "use_linear_projection": True,
}
TINY_VAE = {
    "block_out_channels": [4, 8, 8, 8], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "sample_size": 64, "scaling_factor": 0.18215,
}
TINY_SCHEDULER = {"_class_name": "DDPMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                  "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


def _tiny_models(seed: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET).eval(), AutoencoderKL(**TINY_VAE).eval()


# ------------------------------------------------------------------ diffusers -> LDM names (writer side only;
# the loader reads these files back through diffusers' own converter, which is what the round-trip tests check)
def _unet_prefixes(cfg: dict) -> list[tuple[str, str]]:
    n, per = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("mid_block.attentions.0.", "middle_block.1.")]
    for j in range(2):
        pairs.append((f"mid_block.resnets.{j}.", f"middle_block.{2 * j}."))
    for i in range(n):
        for j in range(per):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{(per + 1) * i + j + 1}.0."))
            pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{(per + 1) * i + j + 1}.1."))
        if i < n - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(per + 1) * (i + 1)}.0.op."))
        up_has_attn = "CrossAttn" in cfg["up_block_types"][i]
        for j in range(per + 1):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{(per + 1) * i + j}.0."))
            pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{(per + 1) * i + j}.1."))
        if i < n - 1:
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(per + 1) * i + per}.{2 if up_has_attn else 1}."))
    return pairs


_RESNET_INNER = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
                 ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."), ("conv_shortcut.", "skip_connection.")]


def unet_to_ldm(state: dict, cfg: dict) -> dict:
    prefixes = sorted(_unet_prefixes(cfg), key=lambda p: -len(p[0]))
    out = {}
    for key, value in state.items():
        new = key
        for hf, sd in prefixes:
            if key.startswith(hf):
                rest = key[len(hf):]
                if ".resnets." in hf:
                    for a, b in _RESNET_INNER:
                        if rest.startswith(a):
                            rest = b + rest[len(a):]
                new = sd + rest
                break
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict, cfg: dict) -> dict:
    n, per = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    pairs = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.") for j in range(2)]
        pairs.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
    for i in range(n):
        for j in range(per):
            pairs.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}."))
        for j in range(per + 1):
            pairs.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}."))
        if i < n - 1:
            pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
            pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample."))
    attn = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]
    pairs.sort(key=lambda p: -len(p[0]))
    out = {}
    for key, value in state.items():
        new = key
        for hf, sd in pairs:
            if key.startswith(hf):
                rest = key[len(hf):].replace("conv_shortcut.", "nin_shortcut.")
                if hf.endswith("attentions.0."):
                    for a, b in attn:
                        if rest.startswith(a):
                            rest = b + rest[len(a):]
                    if value.ndim == 2:  # LDM stores the attention projections as 1x1 convs
                        value = value[:, :, None, None]
                new = sd + rest
                break
        out["first_stage_model." + new] = value
    return out


TINY_TEXT = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 2, "max_position_embeddings": 77, "projection_dim": 32, "hidden_act": "gelu",
             "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "layer_norm_eps": 1e-5}


def _tiny_text_encoder(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**TINY_TEXT)).eval()


def text_encoder_to_openclip(state: dict, prefix: str, extra_blocks: int = 1, seed: int = 0) -> dict:
    """transformers ``CLIPTextModel`` tensors -> an OpenCLIP text tower under ``prefix`` (the layout of SD2
    single files), plus ``extra_blocks`` random blocks after them: SD2 files carry 24 blocks and use 23."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    width = state["embeddings.token_embedding.weight"].shape[1]
    gen = torch.Generator().manual_seed(seed)
    out = {prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": state["final_layer_norm.weight"],
           prefix + "ln_final.bias": state["final_layer_norm.bias"],
           prefix + "text_projection": torch.randn(width, width, generator=gen) * width ** -0.5,
           prefix + "logit_scale": torch.tensor(4.6052)}
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for a, b in names.items():
                out[f"{dst}{b}.{kind}"] = state[f"{src}{a}.{kind}"]
    last = layers[-1]
    for j in range(1, extra_blocks + 1):  # the unused last block(s): random, so a loader that used them would differ
        for key in [k for k in out if k.startswith(f"{prefix}transformer.resblocks.{last}.")]:
            new = key.replace(f"resblocks.{last}.", f"resblocks.{last + j}.")
            out[new] = torch.randn(out[key].shape, generator=gen) * 0.1 + (1.0 if "ln_" in key and "weight" in key else 0.0)
    return out


def _write_diffusers_base(folder: Path, unet, vae, text) -> None:
    from ..loading.text_encoder import quiet_transformers, write_tokenizer_files

    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(TINY_SCHEDULER, indent=1))
    with quiet_transformers():
        text.save_pretrained(folder / "text_encoder", safe_serialization=True)
    write_tokenizer_files(folder / "tokenizer")  # the real SD2 tokenizer (CLIP BPE, padded with "!")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                         "note": "tiny random test model written by headsup make-tiny"}))


def _randomise_lora(module, seed: int, std: float = 0.02) -> None:
    """peft's gaussian init leaves lora_B at zero (a no-op); tests need adapters that change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def write_osediff_pkl(path: str | os.PathLike, unet, vae, rank: int = 4, seed: int = 0, std: float = 0.02) -> Path:
    """An OSEDiff ``.pkl`` for ``unet``/``vae`` (4-channel UNet; conv_in included): LoRA adapters with random
    (non-zero) ``lora_B``, saved the way OSEDiff's ``save_model`` does. Adds the adapters to the modules given."""
    from ..loading.surgery import add_osediff_adapters

    targets = add_osediff_adapters(unet, vae, rank, rank)
    _randomise_lora(unet, seed, std)
    _randomise_lora(vae, seed + 1, std)
    torch.save({
        "vae_lora_encoder_modules": targets["vae_encoder"], "unet_lora_encoder_modules": targets["unet_encoder"],
        "unet_lora_decoder_modules": targets["unet_decoder"], "unet_lora_others_modules": targets["unet_others"],
        "rank_unet": rank, "rank_vae": rank,
        "state_dict_unet": {k: v for k, v in unet.state_dict().items() if "lora" in k or "conv_in" in k},
        "state_dict_vae": {k: v for k, v in vae.state_dict().items() if "lora" in k},
    }, path)
    return Path(path)


def make_tiny(folder: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Write every tiny model under ``folder`` and return their paths."""
    from safetensors.torch import save_file

    from ..loading.base import TINY_CONFIG_KEY
    from ..loading.surgery import add_osediff_adapters, widen_conv_in
    from ..loading.weights import save_headsup_checkpoint

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet, vae = _tiny_models(seed)
    text = _tiny_text_encoder(seed + 7)
    _write_diffusers_base(folder / "base", unet, vae, text)
    ldm = {**unet_to_ldm(unet.state_dict(), TINY_UNET), **vae_to_ldm(vae.state_dict(), TINY_VAE)}
    configs = {"unet": dict(unet.config), "vae": dict(vae.config), "text_encoder": dict(TINY_TEXT)}
    meta = {TINY_CONFIG_KEY: json.dumps(configs), "prediction_type": "epsilon"}
    # Both real single-file layouts: LDM (v2-1_512-ema-pruned: cond_stage_model.model.*) and sgm (sd_turbo:
    # conditioner.embedders.0.model.*), each with its OpenCLIP text tower (one unused extra block, as SD2's).
    for name, prefix in (("base.safetensors", "cond_stage_model.model."),
                         ("base_sgm.safetensors", "conditioner.embedders.0.model.")):
        tensors = {**ldm, **text_encoder_to_openclip(text.state_dict(), prefix, seed=seed + 8)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / name), metadata=meta)
    (folder / "configs.json").write_text(json.dumps(configs, indent=1))

    o_unet, o_vae = _tiny_models(seed)
    write_osediff_pkl(folder / "osediff.pkl", o_unet, o_vae, rank=4, seed=seed + 1)

    # HeadsUp checkpoint: widened conv_in whose reference/mask channels are live (not zero) for tests.
    h_unet, h_vae = _tiny_models(seed)
    widen_conv_in(h_unet, 9)
    with torch.no_grad():
        h_unet.conv_in.weight[:, 4:] = torch.randn(h_unet.conv_in.weight[:, 4:].shape,
                                                    generator=torch.Generator().manual_seed(seed + 3)) * 0.05
    add_osediff_adapters(h_unet, h_vae, 4, 4)
    _randomise_lora(h_unet, seed + 4)
    _randomise_lora(h_vae, seed + 5)
    embeds = torch.randn(1, 77, TINY_UNET["cross_attention_dim"], generator=torch.Generator().manual_seed(seed + 6))
    save_headsup_checkpoint(folder / "headsup.safetensors", h_unet, h_vae, {"note": "tiny random test weights"},
                            prompt_embeds=embeds)
    paths = {"root": folder, "base": folder / "base", "base_single": folder / "base.safetensors",
             "base_sgm": folder / "base_sgm.safetensors", "configs": folder / "configs.json",
             "headsup": folder / "headsup.safetensors", "osediff": folder / "osediff.pkl"}
    try:
        from .tiny_faces import write_tiny_face_models
    except ImportError:
        return paths
    paths.update({k: Path(v) for k, v in write_tiny_face_models(folder).items()})
    return paths
