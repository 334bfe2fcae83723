"""Exact tiled VAE on ComfyUI's own VAE layout (the HeadsUpPatchModel path), against the stand-in blocks in
tests/comfy_stub/comfy/ldm (ComfyUI's attribute layout, SD's VAE maths) holding the tiny VAE's weights.
The real ComfyUI modules are exercised by tests/test_comfyui_e2e.py."""
from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from headsup_core import HeadsUpPipeline, stages
from headsup_core.options import UpscaleOptions
from headsup_core.planner import plan_request
from headsup_core.testing.tiny_models import TINY_VAE, vae_to_ldm
from headsup_core.tiled_vae import decoder_forward, encoder_forward, run_exact, supports_exact
from headsup_core.tiling import TilePlan

sys.path.insert(0, str(Path(__file__).parent / "comfy_stub"))
import harness  # noqa: E402

sys.path.remove(str(Path(__file__).parent / "comfy_stub"))

CPU = torch.device("cpu")
SIDE = 384  # output pixels: 48x48 latents, 3x3 exact VAE tiles of 16 latents
TILED = TilePlan(encoder_tile=16, decoder_tile=16, unet_tile=512)
WHOLE = TilePlan(encoder_tile=512, decoder_tile=512, unet_tile=512)


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """The stand-in ComfyUI on sys.path (and the pack loaded against it), removed afterwards."""
    pack = harness.load_pack(tmp_path_factory.mktemp("models"))
    yield SimpleNamespace(pack=pack, cm=importlib.import_module(harness.PACK_MODULE + ".nodes.comfy_model"),
                          model_patcher=importlib.import_module("comfy.model_patcher"),
                          autoencoder=importlib.import_module("comfy.ldm.models.autoencoder"))
    harness.unload()


@pytest.fixture(scope="module")
def diffusers_model(tiny_models):
    """The HeadsUpLoader path's model on the tiny base + HeadsUp weights (VAE LoRA merged), all in fp32."""
    return HeadsUpPipeline.from_files(tiny_models["base"], tiny_models["headsup"], device="cpu",
                                      dtype=torch.float32).model


def _ldm_vae(comfy, diffusers_vae):
    """ComfyUI's AutoencoderKL layout holding the same weights (the writer-side diffusers -> LDM key map)."""
    widths = TINY_VAE["block_out_channels"]
    vae = comfy.autoencoder.AutoencoderKL(ch=widths[0], ch_mult=[w // widths[0] for w in widths],
                                          num_res_blocks=TINY_VAE["layers_per_block"],
                                          groups=TINY_VAE["norm_num_groups"])
    state = {k[len("first_stage_model."):]: v for k, v in vae_to_ldm(diffusers_vae.state_dict(), TINY_VAE).items()}
    vae.load_state_dict(state, strict=True)
    return vae.eval()


class _GraphVae:
    """What ComfyUI's ``comfy.sd.VAE`` offers the node: the module, its patcher, dtype, device, ratios."""

    def __init__(self, comfy, module, device=CPU):
        self.first_stage_model = module
        self.patcher = comfy.model_patcher.ModelPatcher(module, CPU, CPU)
        self.vae_dtype, self.device, self.downscale_ratio, self.disable_offload = torch.float32, device, 8, False
        self.memory_used_encode = self.memory_used_decode = lambda shape, dtype: 1


def _native(comfy, diffusers_model, module=None, device=CPU):
    base = SimpleNamespace(latent_format=SimpleNamespace(scale_factor=diffusers_model.scaling_factor),
                           model_config=SimpleNamespace(unet_config={"channel_mult": (1, 2), "context_dim": 32}),
                           diffusion_model=SimpleNamespace(model_channels=16))
    module = module if module is not None else _ldm_vae(comfy, diffusers_model.vae)
    return comfy.cm.ComfyHeadsUpModel(SimpleNamespace(model=base), _GraphVae(comfy, module, device), in_channels=4,
                                      prompt_embeds=torch.zeros(1, 77, 32))


def _photo(t1_jpg):
    from PIL import Image

    img = np.asarray(Image.open(t1_jpg).convert("RGB").resize((SIDE, SIDE), Image.BICUBIC), dtype=np.float32)
    return torch.from_numpy(img / 127.5 - 1).permute(2, 0, 1)[None]


def _round_trip(model, x, tiles):
    """The engine's own VAE stages (stages.encode / stages.decode) on ``x`` with ``tiles``; the plan that ran."""
    plan = plan_request(model, (SIDE, SIDE), UpscaleOptions(scale=1.0, tile_size=tiles), CPU)
    latent = stages.encode(model, x, plan, lambda: None)
    return stages.decode(model, latent, plan, lambda: None), latent, plan


def _psnr(a, b):
    mse = (((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2) ** 2).mean().item()
    return 10 * np.log10(1 / max(mse, 1e-30))


def test_the_stand_in_layout_is_the_diffusers_vae(comfy, diffusers_model):
    """The stand-in holds the same VAE: its untiled forwards equal diffusers' on the same weights."""
    ldm, vae = _ldm_vae(comfy, diffusers_model.vae), diffusers_model.vae
    torch.manual_seed(0)
    x, z = torch.rand(1, 3, 64, 96) * 2 - 1, torch.randn(1, 4, 8, 12)
    with torch.no_grad():
        assert torch.allclose(ldm.encode(x), vae.encode(x).latent_dist.mode(), atol=1e-5)
        assert torch.allclose(ldm.decode(z), vae.decode(z).sample, atol=1e-5)


def test_ldm_layout_is_recognised_and_one_lockstep_tile_is_its_forward(comfy, diffusers_model):
    ldm = _ldm_vae(comfy, diffusers_model.vae)
    assert supports_exact(ldm) and supports_exact(diffusers_model.vae)
    torch.manual_seed(1)
    x, z = torch.rand(1, 3, 128, 64) * 2 - 1, torch.randn(1, 4, 16, 8)
    enc = run_exact(encoder_forward, ldm, x, tile=999, in_factor=8, out_factor=1, compute_device=CPU)
    dec = run_exact(decoder_forward, ldm, z, tile=999, in_factor=1, out_factor=8, compute_device=CPU)
    with torch.no_grad():
        assert torch.allclose(enc.chunk(2, 1)[0], ldm.encode(x), atol=1e-5)
        assert torch.allclose(dec, ldm.decode(z), atol=1e-5)


def test_native_exact_tiles_match_untiled_and_the_loader_path(comfy, diffusers_model, t1_jpg):
    """3x3 exact VAE tiles on ComfyUI's layout: >= 60 dB from the untiled native run, and within 1/255 of the
    HeadsUpLoader (diffusers) path's exact tiles; the plan says exact and ComfyUI was asked to load the VAE."""
    native, x = _native(comfy, diffusers_model), _photo(t1_jpg)
    assert native.supports_exact_vae
    loads_before = len(comfy.pack.mm.LOADS)
    tiled, tiled_latent, plan = _round_trip(native, x, TILED)
    assert plan.tiles.vae_mode == "exact" and len(plan.grid("encoder")) == len(plan.grid("decoder")) == 9
    vae_loads = [m for models, *_ in comfy.pack.mm.LOADS[loads_before:] for m in models]
    assert native.vae_obj.patcher in vae_loads  # the lockstep ran on the VAE ComfyUI loaded (with its patches)
    untiled, untiled_latent, whole = _round_trip(native, x, WHOLE)
    assert len(whole.grid("decoder")) == 1
    loader, loader_latent, _ = _round_trip(diffusers_model, x, TILED)
    assert untiled.std() > 0.1  # a real image
    assert _psnr(tiled, untiled) >= 60, _psnr(tiled, untiled)
    assert (tiled - loader).abs().max().item() * 127.5 <= 1, (tiled - loader).abs().max()
    assert torch.allclose(tiled_latent, loader_latent, atol=1e-4)


def test_a_vae_that_cannot_be_tiled_exactly_plans_fast_and_says_so_once(comfy, diffusers_model, caplog):
    ldm = _ldm_vae(comfy, diffusers_model.vae)
    ldm.decoder.tanh_out = True  # a decoder the lockstep forward does not reproduce
    native = _native(comfy, diffusers_model, ldm)
    with caplog.at_level(logging.INFO, logger="HeadsUp"):
        plans = [plan_request(native, (SIDE, SIDE), UpscaleOptions(scale=1.0, tile_size=TILED), CPU)
                 for _ in range(2)]
    assert all(p.tiles.vae_mode == "fast" for p in plans)
    said = [r for r in caplog.records if "cannot run as exact tiles" in r.getMessage()]
    assert len(said) == 1


def test_a_vae_on_another_device_than_the_tiles_plans_fast(comfy, diffusers_model):
    """ComfyUI's --cpu-vae keeps the VAE off the device the engine computes on: no exact tiles there."""
    native = _native(comfy, diffusers_model, device=torch.device("meta"))
    plan = plan_request(native, (SIDE, SIDE), UpscaleOptions(scale=1.0, tile_size=TILED), CPU)
    assert not native.supports_exact_vae and plan.tiles.vae_mode == "fast"
