"""Polyphase nearest-x2 + 3x3 conv upsampler (headsup_core/upsample.py): equal to diffusers' ``Upsample2D``
forward up to float rounding, state_dict untouched, fallbacks, and whole-decoder / exact-tiled-VAE equality."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.upsampling import Upsample2D

from headsup_core import upsample
from headsup_core.tiled_vae import decoder_forward, run_exact
from headsup_core.testing.tiny_models import TINY_VAE

CPU = torch.device("cpu")
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def _pair(seed=0, **kw):
    torch.manual_seed(seed)
    ref = Upsample2D(16, use_conv=True, out_channels=24, **kw).eval()
    fast = copy.deepcopy(ref)
    assert upsample.patch_upsamplers(fast) == 1 and isinstance(fast, Upsample2D)
    return ref, fast


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / a.float().abs().max()).item()


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_upsampler_equals_the_original(fmt, dtype):
    ref, fast = _pair()
    x = torch.randn(2, 16, 7, 9)  # batch 2, odd low-res sizes
    ref.to(dtype).to(memory_format=FORMATS[fmt])
    fast.to(dtype).to(memory_format=FORMATS[fmt])
    x = x.to(dtype).contiguous(memory_format=FORMATS[fmt])
    with torch.no_grad():
        a, b = ref(x), fast(x)
    assert b.shape == a.shape == (2, 24, 14, 18) and b.dtype == dtype
    assert b.is_contiguous(memory_format=FORMATS[fmt])
    assert _rel(a, b) <= (1e-4 if dtype == torch.float32 else 2e-2)


def test_conv2d_0_name_and_no_bias():
    ref, fast = _pair(name="op", bias=False)
    x = torch.randn(1, 16, 5, 6)
    with torch.no_grad():
        assert _rel(ref(x), fast(x)) <= 1e-4


def test_other_upsamplers_are_left_alone():
    others = [Upsample2D(8, use_conv=False), Upsample2D(8, use_conv_transpose=True),
              Upsample2D(8, use_conv=True, kernel_size=5, padding=2), Upsample2D(8, use_conv=True, padding=0),
              Upsample2D(8, use_conv=True, interpolate=False),
              Upsample2D(8, use_conv=True, norm_type="ln_norm", eps=1e-5, elementwise_affine=True)]
    model = torch.nn.ModuleList(others)
    assert upsample.patch_upsamplers(model) == 0
    assert all(type(m) is Upsample2D for m in model)


def test_output_size_other_than_2x_falls_back(monkeypatch):
    ref, fast = _pair()
    calls = []
    real = upsample.polyphase_conv
    monkeypatch.setattr(upsample, "polyphase_conv", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 16, 7, 9)
    with torch.no_grad():
        assert torch.equal(fast(x, output_size=(15, 19)), ref(x, output_size=(15, 19))) and not calls
        assert _rel(ref(x, output_size=(14, 18)), fast(x, output_size=(14, 18))) <= 1e-4 and len(calls) == 1
        assert _rel(ref(x), fast(x)) <= 1e-4 and len(calls) == 2


def test_state_dict_unchanged_and_dtype_or_weight_changes_recompute():
    ref, fast = _pair()
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    x = torch.randn(1, 16, 7, 9)
    with torch.no_grad():
        fast(x)
    after = fast.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert list(dict(fast.named_buffers())) == []
    with torch.no_grad():
        ref.to(torch.bfloat16), fast.to(torch.bfloat16)
        assert _rel(ref(x.bfloat16()), fast(x.bfloat16())) <= 2e-2
        ref.float(), fast.float()
        new = {k: torch.randn_like(v) for k, v in ref.state_dict().items()}
        ref.load_state_dict(new), fast.load_state_dict(new)  # in place: the cache sees the version bump
        assert _rel(ref(x), fast(x)) <= 1e-4
        clone = pickle.loads(pickle.dumps(copy.deepcopy(fast)))
        assert type(clone) is upsample.PolyphaseUpsample2D and _rel(ref(x), clone(x)) <= 1e-4
    assert upsample.unpatch_upsamplers(fast) == 1 and type(fast) is Upsample2D


def test_gradients_through_the_weights_use_the_original_forward():
    ref, fast = _pair()
    x = torch.randn(1, 16, 5, 5)
    ref(x).square().sum().backward()
    fast(x).square().sum().backward()
    assert torch.allclose(ref.conv.weight.grad, fast.conv.weight.grad, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def vaes():
    torch.manual_seed(0)
    ref = AutoencoderKL(**TINY_VAE).eval().to(memory_format=torch.channels_last)
    fast = copy.deepcopy(ref)
    assert upsample.patch_upsamplers(fast) == 3  # the tiny SD2-shaped decoder: 4 up blocks, 3 upsamplers
    return ref, fast


def test_whole_decode_equals_the_unpatched_decode(vaes):
    ref, fast = vaes
    z = torch.randn(1, 4, 12, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ref.decode(z).sample, fast.decode(z).sample
    assert a.shape == b.shape == (1, 3, 96, 80) and _rel(a, b) <= 1e-4
    assert list(ref.state_dict()) == list(fast.state_dict())


def test_exact_tiled_vae_on_the_patched_decoder(vaes):
    ref, fast = vaes
    z = torch.randn(1, 4, 12, 10, generator=torch.Generator().manual_seed(2))
    kw = {"tile": 5, "context": 2, "in_factor": 1, "out_factor": 8, "compute_device": CPU}
    a, b = run_exact(decoder_forward, ref, z, **kw), run_exact(decoder_forward, fast, z, **kw)
    assert a.shape == b.shape == (1, 3, 96, 80) and _rel(a, b) <= 1e-4


def test_a_model_built_under_inference_mode_runs(tmp_path):
    """ComfyUI executes nodes under ``torch.inference_mode``, so a model it loads has inference-tensor weights
    (they keep no in-place edit counter)."""
    with torch.inference_mode():
        ref, fast = _pair(seed=3)
        assert fast.conv.weight.is_inference()
        x = torch.randn(1, 16, 5, 6)
        a, b = ref(x), fast(x)
        again = fast(x)
    assert _rel(a, b) <= 1e-4 and torch.equal(b, again)
