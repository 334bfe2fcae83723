"""Bad weights and options: NaN/Inf refused naming the tensor, lying/truncated safetensors in one sentence, option
ranges named, an over-long prompt cut with one warning."""
from __future__ import annotations

import json
import struct

import pytest
from safetensors.torch import load_file, save_file

from headsup_core.cli import main
from headsup_core.errors import WeightsError


def _metadata(path) -> dict:
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        return json.loads(fh.read(n)).get("__metadata__", {})


def _poisoned(src, dst, value: float, prefix: str = "") -> str:
    tensors = load_file(src)
    key = sorted(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1 and k.startswith(prefix))[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[1] = value
    save_file(tensors, dst, metadata=_metadata(src))
    return key


def test_nan_in_headsup_weights_is_refused_naming_the_tensor(tmp_path, tiny_models, capsys):
    from headsup_core.loading.weights import load_weights

    bad = tmp_path / "nan.safetensors"
    key = _poisoned(tiny_models["headsup"], bad, float("nan"))
    with pytest.raises(WeightsError, match=f"NaN or infinite value.*tensor {key}"):
        load_weights(bad)
    img = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(img)
    assert main(["upscale", str(img), "-o", str(tmp_path / "o.png"), "--base", str(tiny_models["base_single"]),
                 "--weights", str(bad), "--faces", "none", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and key in err and "Traceback" not in err


def test_inf_in_a_base_single_file_is_refused_naming_the_tensor(tmp_path, tiny_models):
    from headsup_core.pipeline import HeadsUpPipeline

    bad = tmp_path / "base_inf.safetensors"
    key = _poisoned(tiny_models["base_single"], bad, float("inf"), prefix="model.diffusion_model.")
    with pytest.raises(WeightsError, match=f"tensor {key}"):
        HeadsUpPipeline.from_files(bad, tiny_models["headsup"], device="cpu")


def test_lying_and_truncated_safetensors_are_one_sentence(tmp_path, tiny_models):
    from headsup_core.loading.weights import load_weights

    raw = tiny_models["headsup"].read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    start, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [start, end + 10_000_000]  # runs far past the end of the file
    text = json.dumps(header).encode()
    lying = tmp_path / "lying.safetensors"
    lying.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: len(raw) // 2])
    for path in (lying, cut):
        with pytest.raises(WeightsError) as info:
            load_weights(path)
        message = str(info.value)
        assert str(path) in message and "corrupt or truncated" in message and "\n" not in message


@pytest.mark.parametrize("option, value, needle", [("--strength", "1.5", "between 0 and 1"),
                                                    ("--strength", "-0.1", "between 0 and 1"),
                                                    ("--tile-size", "0", "at least 64"),
                                                    ("--tile-size", "-64", "at least 64"),
                                                    ("--scale", "0.9", "at least 1")])
def test_out_of_range_options_name_the_range(tmp_path, option, value, needle, capsys):
    from PIL import Image

    img = tmp_path / "in.png"
    Image.new("RGB", (8, 8)).save(img)
    assert main(["upscale", str(img), "-o", str(tmp_path / "o.png"), option, value,
                 "--base", str(tmp_path / "no-base-needed")]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_long_prompt_is_cut_with_one_warning(caplog):
    from headsup_core.loading.text_encoder import MAX_LENGTH, sd2_tokenizer, tokenize

    tokenizer = sd2_tokenizer()
    long_prompt = " ".join(["portrait"] * 60 + ["sharp", "detailed"] * 20 + ["lastword"])
    with caplog.at_level("WARNING"):
        ids = tokenize(tokenizer, long_prompt)
        short = tokenize(tokenizer, "a portrait")
    assert ids.shape == (1, MAX_LENGTH) and short.shape == (1, MAX_LENGTH)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "104 tokens" in warnings[0] and "at most 77" in warnings[0], warnings
    assert "lastword" in warnings[0]
