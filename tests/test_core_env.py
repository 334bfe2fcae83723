"""Device/dtype choice, the model root layout, and licence notes."""
from __future__ import annotations

import pytest
import torch

from headsup_core import devices, precision
from headsup_core.errors import HeadsUpError
from headsup_core.licences import describe_licence
from headsup_core.model_paths import find_base, find_weights, model_root


def test_device_and_dtype_choice():
    assert devices.pick_device("cpu") == torch.device("cpu")
    assert precision.pick_dtype(None, torch.device("cpu")) == torch.float32
    assert precision.pick_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    # GPUs default to fp16, not bf16: the one-step update amplifies eps errors 14.6x (docs/benchmark.md).
    assert precision.pick_dtype(None, torch.device("cuda")) == torch.float16
    with pytest.raises(HeadsUpError, match="Unknown dtype"):
        precision.pick_dtype("int3", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(HeadsUpError, match="no CUDA"):
            devices.pick_device("cuda")


def test_upcast_restores_the_dtype():
    module = torch.nn.Linear(2, 2).to(torch.bfloat16)
    with precision.upcast(module):
        assert module.weight.dtype == torch.float32
    assert module.weight.dtype == torch.bfloat16


def test_model_root_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSUP_MODEL_ROOT", str(tmp_path))
    assert model_root() == tmp_path and model_root(tmp_path / "x") == tmp_path / "x"
    assert find_base(tmp_path) is None and find_weights(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "sd_turbo.safetensors").write_bytes(b"x")
    (tmp_path / "headsup").mkdir()
    (tmp_path / "headsup" / "notes.txt").write_text("not weights")
    (tmp_path / "headsup" / "osediff.pkl").write_bytes(b"x")
    assert find_base(tmp_path).name == "sd_turbo.safetensors"
    assert find_weights(tmp_path).name == "osediff.pkl"


def test_licence_notes_name_non_commercial_files():
    assert "non-commercial" in describe_licence("models/insightface/models/antelopev2")
    assert "non-commercial" in describe_licence("checkpoints/sd_turbo.safetensors")
    assert "RAIL" in describe_licence("v2-1_512-ema-pruned.safetensors")
    assert describe_licence("my_own_weights.safetensors") is None
