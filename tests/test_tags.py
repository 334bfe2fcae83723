"""The DAPE/RAM tagger: files, RAM's key layout and loading rules, the decision, the front ends, and (when RAM's own
code is at hand, see tests/ram_reference.py) parity with it on random weights in its exact layout."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ram_reference
from headsup_core.errors import MissingModelError, WeightsError
from headsup_core.tags import DapeTagger, find_tagger_files
from headsup_core.tags.files import tagging_state_dict
from headsup_core.testing.tiny_tags import SMALL_SWIN, random_ram_states, write_random_ram

VOCAB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ram"
HAS_VOCAB = (VOCAB / "ram_tag_list.txt").is_file() and (VOCAB / "ram_tag_list_threshold.txt").is_file()


@pytest.fixture(scope="module")
def tiny_ram(tmp_path_factory):
    return write_random_ram(tmp_path_factory.mktemp("ram"), num_classes=64, seed=0)


@pytest.fixture(scope="module")
def vocab_ram(tmp_path_factory):
    if not HAS_VOCAB:
        pytest.skip("RAM's tag vocabulary is not in ../shared/data/ram/")
    return write_random_ram(tmp_path_factory.mktemp("ram_vocab"), VOCAB / "ram_tag_list.txt",
                            VOCAB / "ram_tag_list_threshold.txt", seed=1)


def _images(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 3, 90 + 13 * i, 120 - 7 * i, generator=g) for i in range(n)]


def test_missing_files_are_each_named(tmp_path):
    with pytest.raises(MissingModelError) as err:
        find_tagger_files(tmp_path)
    msg = str(err.value)
    for name in ("ram_swin_large_14m.pth", "DAPE.pth", "ram_tag_list.txt", "ram_tag_list_threshold.txt"):
        assert name in msg
    write_random_ram(tmp_path / "ram", num_classes=8)
    os.remove(tmp_path / "ram" / "DAPE.pth")
    with pytest.raises(MissingModelError, match="DAPE.pth") as err:
        find_tagger_files(tmp_path)
    assert "ram_tag_list" not in str(err.value).split(" Put ")[0]
    assert find_tagger_files(tmp_path, use_dape=False).dape is None


def test_reads_only_tagging_tensors_and_merges_lora_like_loralib(tiny_ram):
    sd = tagging_state_dict(tiny_ram["ram"], tiny_ram["dape"])
    assert not any(k.startswith(("tag_encoder.", "text_decoder.")) or "lora_" in k for k in sd)
    assert not any(".attention." in k or k.endswith(("relative_position_index", "attn_mask")) for k in sd)
    ram = torch.load(tiny_ram["ram"], weights_only=True)["model"]
    dape = torch.load(tiny_ram["dape"], weights_only=True)
    # Swin qkv: loralib MergedLinear(r=8, enable_lora=[True, False, True]), scaling lora_alpha / r = 1 / 8,
    # delta = zero-padded grouped conv1d of lora_A by lora_B (written here the way loralib writes it).
    k = "visual_encoder.layers.1.blocks.1.attn.qkv."
    a, b = dape[k + "lora_A"], dape[k + "lora_B"]
    delta = torch.nn.functional.conv1d(a[None], b[..., None], groups=2)[0]
    dim = ram[k + "weight"].shape[1]
    padded = torch.zeros(3 * dim, dim)
    padded[torch.tensor([True, False, True]).repeat_interleave(dim)] = delta
    assert torch.allclose(sd[k + "weight"], ram[k + "weight"] + padded / 8, atol=1e-6)
    # Cross-attention query: tied to the tag encoder's, and eval() merges both modules' LoRA into it.
    q = "encoder.layer.1.crossattention.self.query."
    want = ram["tagging_head." + q + "weight"] + sum(
        dape[o + q + "lora_B"] @ dape[o + q + "lora_A"] / 8 for o in ("tagging_head.", "tag_encoder."))
    assert torch.allclose(sd["tagging_head." + q + "weight"], want, atol=1e-6)
    assert torch.equal(sd["image_proj.bias"], dape["image_proj.bias"])  # DAPE's tensors win over RAM's
    assert torch.equal(sd["tagging_head.encoder.layer.0.output.dense.weight"],
                       ram["tagging_head.encoder.layer.0.output.dense.weight"])


def test_vision_multi_rename_and_tag_encoder_tie(tmp_path):
    ram, _ = random_ram_states(16, seed=3)
    moved = {}
    for k, v in ram.items():
        if k.startswith("tagging_head.encoder.layer.0."):
            moved[k.replace("tagging_head.", "vision_multi.", 1)] = v  # older RAM files: renamed on load
        elif k.startswith("tagging_head.encoder.layer.1.intermediate"):
            continue  # only under the tag encoder's name: the tie fills it
        else:
            moved[k] = v
    moved["tag_encoder.encoder.layer.1.intermediate.dense.bias"] = torch.full((3072,), 0.25)
    torch.save({"model": moved}, tmp_path / "ram.pth")
    sd = tagging_state_dict(tmp_path / "ram.pth")
    assert torch.equal(sd["tagging_head.encoder.layer.0.output.dense.weight"],
                       ram["tagging_head.encoder.layer.0.output.dense.weight"])
    assert torch.equal(sd["tagging_head.encoder.layer.1.intermediate.dense.bias"], torch.full((3072,), 0.25))
    torch.save({"model": {"first_stage_model.x": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="other.pth is not a RAM checkpoint"):
        tagging_state_dict(tmp_path / "other.pth")
    del moved["label_embed"]
    torch.save({"model": moved}, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match="label_embed"):
        tagging_state_dict(tmp_path / "broken.pth")


def test_decision_thresholds_and_deleted_tags(tiny_ram, tmp_path):
    tagger = DapeTagger(ram=tiny_ram["ram"], dape=tiny_ram["dape"], device="cpu", unload_after=False,
                        osediff_resize=False)
    img = _images(1)[0]
    probs = tagger.probabilities(img)[0]
    names = Path(tiny_ram["tag_list"]).read_text().splitlines()
    th = [float(v) for v in Path(tiny_ram["thresholds"]).read_text().split()]
    kept = [names[i] for i in range(len(names)) if probs[i] > th[i]]
    assert 0 < len(kept) < len(names)
    assert tagger(img) == ", ".join(kept) == tagger.last_tags
    first = names.index(kept[0])
    deleting = DapeTagger(ram=tiny_ram["ram"], dape=tiny_ram["dape"], device="cpu", delete_tag_index=[first],
                          osediff_resize=False)
    assert deleting(img) == ", ".join(kept[1:])
    # RAM keeps a file threshold above 0.9 as it is, and caps lower ones at 0.9 (they all are below it)
    (tmp_path / "th.txt").write_text("\n".join(["0.95"] + ["0.5"] * (len(names) - 1)))
    other = DapeTagger(ram=tiny_ram["ram"], dape=tiny_ram["dape"], thresholds=tmp_path / "th.txt")
    other.load()
    assert other.thresholds[0].item() == pytest.approx(0.95) and other.thresholds[1].item() == pytest.approx(0.5)
    assert tagger.loaded and tagger.size_bytes() > 0
    tagger.unload()
    assert not tagger.loaded and tagger(img) == ", ".join(kept)  # loaded again on use


def test_default_input_is_what_test_osediff_tags(tiny_ram):
    from PIL import Image

    from headsup_core.tags.tagger import osediff_input

    rng = np.random.RandomState(0)
    for w, h in ((45, 30), (150, 133)):
        arr = (rng.rand(h, w, 3) * 255).astype(np.uint8)
        # test_osediff.py: enlarge to a 128 short side when smaller, x4 (PIL's default resample), LANCZOS to /8
        img = Image.fromarray(arr)
        if w < 128 or h < 128:
            s = 128 / min(w, h)
            img = img.resize((int(s * w), int(s * h)))
        img = img.resize((img.size[0] * 4, img.size[1] * 4))
        img = img.resize((img.width - img.width % 8, img.height - img.height % 8), Image.LANCZOS)
        want = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255
        got = osediff_input(torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255)
        assert got.shape == want.shape and torch.equal(got, want)
    tagger = DapeTagger(ram=tiny_ram["ram"], dape=tiny_ram["dape"], device="cpu")
    lq = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255
    assert tagger(lq) == tagger.decide(tagger.probabilities(osediff_input(lq)))[0]


def test_preprocess_is_torchvision_resize_then_imagenet_normalize():
    tv = pytest.importorskip("torchvision.transforms")
    from headsup_core.tags import preprocess

    img = _images(1)[0]
    ref = tv.Compose([tv.Resize((384, 384)), tv.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])(img)
    assert torch.allclose(preprocess(img), ref, atol=1e-5)


@pytest.mark.skipif(not ram_reference.available(), reason=f"RAM's own code: set {ram_reference.ENV} (see tests/ram_reference.py)")
def test_parity_with_ram_reference_small_swin(vocab_ram):
    small = dict(SMALL_SWIN, vision_width=SMALL_SWIN["embed_dim"] * 8)
    ref = ram_reference.load(vocab_ram["ram"], vocab_ram["dape"], vocab_ram["tag_list"], swin=small)
    ours = DapeTagger(ram=vocab_ram["ram"], dape=vocab_ram["dape"], tag_list=vocab_ram["tag_list"],
                      thresholds=vocab_ram["thresholds"], device="cpu", osediff_resize=False)
    for img in _images(2, seed=5):
        ref_probs, ref_tags = ram_reference.run(ref, img)
        assert (ours.probabilities(img) - ref_probs).abs().max().item() < 1e-4
        assert ours.tag(img) == ref_tags and ref_tags[0]


def test_pipeline_tag_source_logs_and_returns_tags(tiny_models, tiny_ram, caplog):
    from headsup_core import HeadsUpPipeline

    pipe = HeadsUpPipeline.from_files(tiny_models["base_single"], tiny_models["osediff"], device="cpu")
    tagger = DapeTagger(ram=tiny_ram["ram"], dape=tiny_ram["dape"], device="cpu")
    img = (np.random.RandomState(0).rand(16, 16, 3) * 255).astype(np.uint8)
    with caplog.at_level("INFO", logger="headsup"):
        out, info = pipe.upscale(img, 2, color_fix="none", prompt="a man", tag_source=tagger, return_info=True)
    tags = tagger.last_tags
    assert info["tags"] == [tags] and tags and f"tags: {tags}" in caplog.text
    same = pipe.upscale(img, 2, color_fix="none", prompt_embeds=pipe.encode_prompt(f"{tags}, a man,"))
    assert np.array_equal(out, same)
    assert pipe.upscale(img, 2, color_fix="none", return_info=True)[1]["tags"] is None


def test_cli_tags_and_upscale_with_dape(tiny_models, tiny_ram, tmp_path):
    from PIL import Image

    src = tmp_path / "in.png"
    Image.fromarray((np.random.RandomState(0).rand(20, 20, 3) * 255).astype(np.uint8)).save(src)
    env = dict(os.environ, HEADSUP_MODEL_ROOT=str(Path(tiny_ram["ram"]).parent.parent))
    folder = Path(tiny_ram["ram"]).parent
    (folder.parent / "ram").exists() or (folder.parent / "ram").symlink_to(folder)
    run = subprocess.run([sys.executable, "-m", "headsup_core.cli", "tags", str(src)], capture_output=True,
                         text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    tags = run.stdout.strip()
    assert tags and "tag " in tags
    run = subprocess.run([sys.executable, "-m", "headsup_core.cli", "upscale", str(src), "-o", str(tmp_path / "o.png"),
                          "--scale", "2", "--base", str(tiny_models["base_single"]), "--weights",
                          str(tiny_models["osediff"]), "--tags", "dape"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    assert f"tags: {tags}" in run.stderr  # logged at INFO: shown by default (-q keeps only warnings and errors)
    run = subprocess.run([sys.executable, "-m", "headsup_core.cli", "tags", str(src), "--dape", str(tmp_path / "no.pth")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 2 and "no.pth" in run.stderr and "Traceback" not in run.stderr


def test_released_after_a_call_when_memory_is_short(tiny_ram, monkeypatch):
    import headsup_core.memory as memory

    img = _images(1)[0]
    forced = DapeTagger(ram=tiny_ram["ram"], dape=tiny_ram["dape"], device="cpu", unload_after=True)
    forced(img)
    assert not forced.loaded and forced.last_tags is not None
    auto = DapeTagger(ram=tiny_ram["ram"], dape=tiny_ram["dape"], device="cpu")
    auto(img)
    assert auto.loaded  # plenty of free memory: kept for the next image
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1)
    auto(img)
    assert not auto.loaded  # short: released before the UNet runs
