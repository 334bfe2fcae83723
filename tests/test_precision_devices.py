"""One precision policy (headsup_core/precision.py), asked by every front end, on a table of simulated devices.

For each device the test asks each front end for the dtype it would build the pipeline with, then turns that into
per-stage compute dtypes the way loading/build.py does (``compute_dtypes`` on the device that computes):
* library / CLI: ``HeadsUpPipeline.from_files(device=..., dtype=None)`` (the CLI's ``--dtype auto``);
* ComfyUI ``HeadsUpLoader``: ``nodes.loaders.comfy_dtype("auto", load_device)`` with what ComfyUI's
  ``model_management`` says the device supports;
* ComfyUI ``HeadsUpPatchModel``: the host's own UNet dtype for SD2 (ComfyUI picks the first of fp16, bf16, fp32
  the device supports), which ``ComfyHeadsUpModel.compute_dtype`` reports; it runs the host's modules, so on a
  CPU its VAE decoder stays in the host's fp32 where the other front ends use the measured bf16 decoder;
* A1111/Forge: ``_device_dtype()`` of the extension script with the webui's ``devices.device``.
The CUDA/MPS rows are simulated (the device object and the host's answers), so they run without a GPU.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from headsup_core import precision

ROOT = Path(__file__).resolve().parent.parent
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# name: (device, CPU has native bf16, ComfyUI's should_use_fp16, should_use_bf16, expected {unet, encoder, decoder})
DEVICES = {
    "cpu avx512-bf16": ("cpu", True, False, False, {"unet": F32, "encoder": F32, "decoder": BF16}),
    "cpu without bf16": ("cpu", False, False, False, {"unet": F32, "encoder": F32, "decoder": F32}),
    "cuda sm 7.5": ("cuda", False, True, False, {"unet": F16, "encoder": F16, "decoder": F16}),
    "cuda sm 8.6": ("cuda", False, True, True, {"unet": F16, "encoder": F16, "decoder": F16}),
    "cuda sm 9.0": ("cuda", False, True, True, {"unet": F16, "encoder": F16, "decoder": F16}),
    "mps": ("mps", False, True, False, {"unet": F16, "encoder": F16, "decoder": F16}),
}


@pytest.fixture
def comfy_loaders(tmp_path):
    sys.path.insert(0, str(ROOT / "tests" / "comfy_stub"))
    import harness

    sys.path.remove(str(ROOT / "tests" / "comfy_stub"))
    pack = harness.load_pack(tmp_path)
    yield pack.module("nodes.loaders"), pack.mm, harness.PACK_MODULE
    harness.unload()


@pytest.fixture
def a1111_script():
    stub = ROOT / "tests" / "a1111_stub"
    sys.path.insert(0, str(stub))
    try:
        from modules import devices

        spec = importlib.util.spec_from_file_location("headsup_a1111_precision", ROOT / "scripts" / "headsup_a1111.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod, devices
    finally:
        sys.path.remove(str(stub))
        for name in [n for n in sys.modules if n == "modules" or n.startswith("modules.")]:
            del sys.modules[name]


def _host_sd2_dtype(device: torch.device, fp16_ok: bool, bf16_ok: bool) -> torch.dtype:
    """ComfyUI's choice for an SD2 UNet: the first of its supported inference dtypes the device can run."""
    if device.type == "cpu":
        return F32
    return F16 if fp16_ok else BF16 if bf16_ok else F32


@pytest.mark.parametrize("name", list(DEVICES))
def test_every_front_end_gets_the_same_dtypes_per_stage(name, comfy_loaders, a1111_script, monkeypatch):
    kind, native_bf16, fp16_ok, bf16_ok, expected = DEVICES[name]
    device = torch.device(kind)
    monkeypatch.delenv(precision.ENV_BF16, raising=False)  # conftest pins it for the suite; the policy is tested
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda flags=None: native_bf16)
    loaders, mm, pack_name = comfy_loaders
    monkeypatch.setattr(mm, "should_use_fp16", lambda *a, **k: fp16_ok)
    monkeypatch.setattr(mm, "should_use_bf16", lambda *a, **k: bf16_ok)
    script, webui_devices = a1111_script
    monkeypatch.setattr(webui_devices, "device", device)
    monkeypatch.setattr(webui_devices, "dtype", BF16 if bf16_ok else F16)  # the webui's own choice is not ours

    per_front_end = {
        "library/CLI": precision.compute_dtypes(device, None),
        "HeadsUpLoader": precision.compute_dtypes(device, loaders.comfy_dtype("auto", device)),
        "A1111": precision.compute_dtypes(*script._device_dtype()),
    }
    ComfyHeadsUpModel = importlib.import_module(f"{pack_name}.nodes.comfy_model").ComfyHeadsUpModel

    host = _host_sd2_dtype(device, fp16_ok, bf16_ok)
    native = ComfyHeadsUpModel.__new__(ComfyHeadsUpModel)
    native.patcher = SimpleNamespace(model=SimpleNamespace(manual_cast_dtype=None, get_dtype=lambda: host))
    native.vae_obj = SimpleNamespace(vae_dtype=host)
    per_front_end["HeadsUpPatchModel"] = {s: native.compute_dtype(s) for s in expected}

    for front_end, dtypes in per_front_end.items():
        want = dict(expected)
        if front_end == "HeadsUpPatchModel" and device.type == "cpu":
            want["decoder"] = host  # the host's own VAE module keeps the host's dtype (ComfyUI: fp32 on a CPU)
        assert {s: dtypes[s] for s in expected} == want, (name, front_end)


def test_a_named_dtype_wins_everywhere():
    for kind in ("cpu", "cuda", "mps"):
        dev = torch.device(kind)
        assert precision.compute_dtypes(dev, "bf16") == {s: BF16 for s in precision.STAGES}
        assert precision.host_dtype("fp32", dev) == F32


def test_storage_follows_the_device_that_computes(tiny_models, monkeypatch):
    """A host that builds on its offload device (the CPU) for a GPU run gets the GPU's dtypes and no CPU formats:
    no 16-bit storage with cast hooks chosen for CPU RAM, no channels_last/bf16 CPU choices."""
    from headsup_core import HeadsUpPipeline

    monkeypatch.setattr(precision, "cpu_native_bf16", lambda flags=None: True)
    monkeypatch.delenv(precision.ENV_BF16, raising=False)
    pipe = HeadsUpPipeline.from_files(tiny_models["base"], tiny_models["headsup"], device="cpu",
                                      dtype=precision.host_dtype("auto", torch.device("cuda")),
                                      compute_device="cuda", weight_dtype="auto")
    assert pipe.source["formats"] == {}
    assert {s: d["compute"] for s, d in pipe.source["dtypes"].items()} == {s: "float16" for s in precision.STAGES}
    assert pipe.model.unet.conv_in.weight.dtype == F16 and pipe.model.vae.decoder.conv_in.weight.dtype == F16
    cpu = HeadsUpPipeline.from_files(tiny_models["base"], tiny_models["headsup"], device="cpu")
    assert cpu.source["formats"]["decoder"] == "bf16" and cpu.model.encoder_dtype == F32
