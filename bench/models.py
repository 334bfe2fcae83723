"""The models the pipeline benchmark runs, built the way users load theirs: from single files on disk.

``sd21``: the SD2.1-base architecture (the configs shipped in headsup_core) with seeded random weights, written
once as an LDM-layout single file in fp16 (how SD2.x checkpoints are usually shared; ~1.9 GB, UNet + VAE, no
text encoder) and read back through ``HeadsUpPipeline.from_files``, so loading, its dtypes and its peak memory
are part of every row. No HeadsUp weights exist, so conv_in is widened with zeros and the text conditioning is a
fixed random embedding (the file has no text encoder). ``sd21-folder``: the same architecture from the next seed,
as an fp32 diffusers folder (UNet + VAE, no text encoder) read through the same ``from_files``, so the two base
formats' peak memory can be compared at the same settings. ``tiny``: the ``make-tiny`` model.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

SD21_FILE = "sd21_random_seed{seed}_fp16.safetensors"
EMBED_SEED_OFFSET = 7


class _Quiet(logging.Filter):
    """The two loud warnings a base without weights and without a text encoder gives are expected here."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("No HeadsUp weights given" in msg or "no text conditioning" in msg)


def sd21_single_file(folder: str | Path, seed: int = 0) -> Path:
    """Write (once) the seeded random SD2.1-size base as an LDM single file in fp16; returns its path."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file

    from headsup_core.loading.base import CONFIG_DIR
    from headsup_core.testing.tiny_models import unet_to_ldm, vae_to_ldm

    path = Path(folder) / SD21_FILE.format(seed=seed)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    unet_cfg = json.loads((CONFIG_DIR / "sd2" / "unet" / "config.json").read_text())
    vae_cfg = json.loads((CONFIG_DIR / "sd2" / "vae" / "config.json").read_text())
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(unet_cfg)
    sd = {k: v.detach().half().contiguous() for k, v in unet_to_ldm(unet.state_dict(), dict(unet.config)).items()}
    del unet
    vae = AutoencoderKL.from_config(vae_cfg)
    sd.update({k: v.detach().half().contiguous() for k, v in vae_to_ldm(vae.state_dict(), dict(vae.config)).items()})
    del vae
    tmp = path.with_suffix(".partial")
    save_file(sd, str(tmp), metadata={"prediction_type": "epsilon", "note": "random weights, benchmark only"})
    tmp.replace(path)
    return path


def default_files_dir() -> str:
    """Where the benchmark's weight sets are written once and reused (bench/pipeline.py's --files-dir default)."""
    import tempfile

    return str(Path(tempfile.gettempdir()) / "headsup-bench-files")


def sd21_diffusers_set(folder: str | Path, seed: int = 1) -> tuple[Path, Path]:
    """Write (once) a second, independent SD2.1-size weight set: a diffusers folder (UNet + VAE, fp32, seeded
    random) and an OSEDiff-format ``.pkl`` of random rank-4 LoRA adapters for it. Returns (folder, pkl)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from headsup_core.loading.base import CONFIG_DIR
    from headsup_core.testing.tiny_models import write_osediff_pkl

    root = Path(folder) / f"sd21_random_seed{seed}_diffusers"
    base, pkl = root / "base", root / "osediff_random.pkl"
    if (root / "done").exists():
        return base, pkl
    unet_cfg = json.loads((CONFIG_DIR / "sd2" / "unet" / "config.json").read_text())
    vae_cfg = json.loads((CONFIG_DIR / "sd2" / "vae" / "config.json").read_text())
    torch.manual_seed(seed)
    unet, vae = UNet2DConditionModel.from_config(unet_cfg), AutoencoderKL.from_config(vae_cfg)
    unet.save_pretrained(base / "unet", safe_serialization=True)
    vae.save_pretrained(base / "vae", safe_serialization=True)
    (base / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "note": "random weights, benchmark only"}))
    write_osediff_pkl(pkl, unet, vae, rank=4, seed=seed + 100)
    (root / "done").write_text("ok")
    return base, pkl


def build_pipeline(model: str, files: str, device, dtype_requested, seed: int, *, defaults: bool,
                   weight_dtype: str = "auto"):
    """Our pipeline as a user gets it (``defaults``: ``from_files`` with the measured per-stage formats), or the
    fp32, contiguous, plain-diffusers model the ``full`` and ``ref`` paths run."""
    import torch

    from headsup_core.loading.build import build_model
    from headsup_core.pipeline import HeadsUpPipeline

    logging.getLogger("headsup").addFilter(_Quiet())
    if model == "tiny":
        base, weights = Path(files) / "base", Path(files) / "headsup.safetensors"
    elif model == "sd21-folder":  # the second weight set, from seed + 1, as the fp32 diffusers folder it is shared as
        base, weights = sd21_diffusers_set(files, seed + 1)[0], None
    else:
        base, weights = Path(files) / SD21_FILE.format(seed=seed), None
    if defaults:
        pipe = HeadsUpPipeline.from_files(base, weights, device=device, dtype=dtype_requested,
                                          weight_dtype=weight_dtype)
    else:
        m, info = build_model(base, weights, device, "fp32", weight_dtype="fp32")
        m.to(memory_format=torch.contiguous_format)
        pipe = HeadsUpPipeline(m, info.pop("text_encoder_loader"), info)
    if model.startswith("sd21"):
        gen = torch.Generator().manual_seed(seed + EMBED_SEED_OFFSET)
        embeds = torch.randn(1, 77, pipe.model.cross_attention_dim, generator=gen)
        pipe.model.default_prompt_embeds = embeds.to(pipe.model.default_prompt_embeds.device)
    return pipe
