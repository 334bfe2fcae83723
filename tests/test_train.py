"""Trainer on the tiny models: only the intended parameters train, checkpoints load in the pipeline with the same
output, resume is bit-exact on CPU, and the CLI runs end to end."""

import json
from importlib import resources
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from headsup_core.faces import load_face_analyzer
    from headsup_core.testing.tiny_models import make_tiny
    from headsup_core.train.dataset import BuildOptions, build_dataset

    root = tmp_path_factory.mktemp("train")
    paths = make_tiny(root / "tiny")
    an = load_face_analyzer("insightface", model_root=root / "tiny" / "insightface", pack="tiny")
    img_dir = Path(resources.files("insightface").joinpath("data/images"))
    tom = Image.open(img_dir / "Tom_Hanks_54745.png").convert("RGB")
    t1 = Image.open(img_dir / "t1.jpg").convert("RGB")
    src = root / "src"
    src.mkdir()
    tom.resize((256, 256), Image.BICUBIC).save(src / "tom.png")
    pair = Image.new("RGB", (512, 256))
    pair.paste(tom.resize((256, 256), Image.LANCZOS), (0, 0))
    pair.paste(t1.crop((0, 0, 400, 400)).resize((256, 256)), (256, 0))
    pair.save(src / "pair.png")
    t1.crop((300, 0, 700, 400)).save(src / "other.png")
    opts = BuildOptions(min_size=(200, 200), aspect=(0.4, 2.5), min_eye_distance=40, quality_metric="none",
                        test_fraction=0.0)
    s = build_dataset([src], root / "ds", opts, analyzer=an, progress=False)
    assert s["kept"] == 3 and s["pairs"]["train"] >= 2
    return {"root": root, "base": paths["base"], "manifest": root / "ds" / "manifest.jsonl",
            "osediff": paths["osediff"]}


def _cfg(setup, out, **over):
    from headsup_core.train.config import load_train_config

    o = {"base": str(setup["base"]), "output_dir": str(setup["root"] / out),
         "data": {"manifest": str(setup["manifest"])}}
    o.update(over)
    return load_train_config(resources.files("headsup_core").joinpath("configs/train_tiny.yaml"), o)


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_one_step_changes_only_intended_parameters(setup):
    from headsup_core.train.trainer import Trainer

    tr = Trainer(_cfg(setup, "one"))
    model = tr.acc.unwrap_model(tr.generator).model
    reg = tr.acc.unwrap_model(tr.reg).unet
    before = {"unet": _snapshot(model.unet), "vae": _snapshot(model.vae), "reg": _snapshot(reg)}
    logs = tr.train(max_steps=1)
    assert logs[0]["faces"] > 0 and all(k in logs[0] for k in ("mse", "lpips", "vsd", "face_id", "face_adv"))
    after = {"unet": dict(model.unet.named_parameters()), "vae": dict(model.vae.named_parameters()),
             "reg": dict(reg.named_parameters())}
    intended = {"unet": lambda n: "lora_" in n or n.startswith("conv_in."),
                "vae": lambda n: "lora_" in n, "reg": lambda n: "lora_" in n}
    for part in before:
        changed = {n for n, p in after[part].items() if not torch.equal(p, before[part][n])}
        assert changed, part
        assert all(intended[part](n) for n in changed), (part, sorted(n for n in changed if not intended[part](n)))
        assert any("lora_B" in n for n in changed), part
    assert "conv_in.base_layer.weight" in {n for n, p in after["unet"].items()
                                           if not torch.equal(p, before["unet"][n])}
    # the VAE decoder is frozen: no LoRA there, nothing changed
    assert not any(n.startswith("decoder.") and "lora_" in n for n in after["vae"])


def test_checkpoint_loads_in_pipeline_with_same_output(setup):
    from headsup_core.pipeline import HeadsUpPipeline
    from headsup_core.train.trainer import Trainer

    tr = Trainer(_cfg(setup, "ckpt"))
    tr.train(max_steps=2)
    ckpt = tr.out / "headsup_final.safetensors"
    assert ckpt.is_file()
    gen = tr.acc.unwrap_model(tr.generator).eval()
    lq = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(0))  # BxHxWxC float, as ComfyUI
    up = torch.nn.functional.interpolate(lq.permute(0, 3, 1, 2), size=(64, 64), mode="bicubic",
                                         align_corners=False).clamp(0, 1)
    with torch.no_grad():
        _, sr = gen(up * 2 - 1, torch.zeros(1, 3, 64, 64), torch.zeros(1, 1, 64, 64), torch.tensor([False]),
                    tr.prompt_embeds)
    mine = ((sr + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    pipe = HeadsUpPipeline.from_files(setup["base"], ckpt, device="cpu", dtype=torch.float32)
    theirs = pipe.upscale(lq, scale=4, color_fix="none")
    assert theirs.shape == mine.shape
    assert (theirs - mine).abs().max().item() < 2e-4
    assert not torch.allclose(theirs, up.permute(0, 2, 3, 1), atol=1e-2)  # it is a real model output


def test_init_from_osediff_weights(setup):
    from headsup_core.loading.weights import load_weights
    from headsup_core.train.trainer import Trainer

    tr = Trainer(_cfg(setup, "init", init_weights=str(setup["osediff"])))
    converted = load_weights(tr.out / "init_from_osediff.safetensors")
    unet = tr.acc.unwrap_model(tr.generator).model.unet
    own = dict(unet.named_parameters())
    lora = [k for k in converted.unet_state if "lora_" in k]
    assert lora and all(torch.equal(own[k], converted.unet_state[k]) for k in lora)
    assert torch.equal(unet.conv_in.base_layer.weight, converted.unet_state["conv_in.weight"])
    assert unet.conv_in.base_layer.weight[:, 4:].abs().max() == 0  # reference/mask channels start at zero
    vae = dict(tr.acc.unwrap_model(tr.generator).model.vae.named_parameters())
    assert all(torch.equal(vae[k], v) for k, v in converted.vae_state.items())


def test_resume_is_bit_exact(setup):
    from headsup_core.train.trainer import Trainer

    straight = Trainer(_cfg(setup, "straight")).train(max_steps=3)
    first = Trainer(_cfg(setup, "split"))
    first.train(max_steps=2)
    resumed = Trainer(_cfg(setup, "split", resume="latest"))
    assert resumed.step == 2
    rest = resumed.train(max_steps=3)
    assert len(rest) == 1 and rest[0]["step"] == 3
    for k, v in straight[2].items():
        assert rest[0][k] == v, k
    from safetensors.torch import load_file

    a = load_file(str(Path(setup["root"]) / "straight" / "headsup_final.safetensors"))
    b = load_file(str(Path(setup["root"]) / "split" / "headsup_final.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_dataset_build_and_train(setup, tmp_path, capsys):
    import yaml

    from headsup_core.cli import main

    src = Path(setup["root"]) / "src"
    assert main(["dataset", "build", str(src), str(tmp_path / "ds"), "--min-size", "200x200", "--aspect",
                 "0.4-2.5", "--min-eye-distance", "40", "--quality-metric", "none", "--test-fraction", "0",
                 "--faces", "insightface", "--face-models", str(Path(setup["root"]) / "tiny" / "insightface"),
                 "--face-pack", "tiny", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "kept" in out and (tmp_path / "ds" / "manifest.jsonl").is_file()
    cfg = yaml.safe_load(resources.files("headsup_core").joinpath("configs/train_tiny.yaml").read_text())
    cfg.update(base=str(setup["base"]), output_dir="run", stages=[{"name": "general", "steps": 1,
               "data": {"manifest": None, "folders": [str(src)]}, "losses": {"face_id": 0, "face_adv": 0}},
               {"name": "portrait", "steps": 1}], val_every=2, save_every=2)
    cfg["data"]["manifest"] = "ds/manifest.jsonl"
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 0
    logs = [json.loads(line) for line in (tmp_path / "run" / "logs.jsonl").read_text().splitlines()]
    assert [x["stage"] for x in logs] == ["general", "portrait"]
    assert logs[0]["faces"] == 0 and "face_id" not in logs[0] and logs[1]["faces"] > 0
    assert (tmp_path / "run" / "checkpoints" / "headsup_step_0000002.safetensors").is_file()
    assert (tmp_path / "run" / "val" / "step_0000002.png").is_file()
    assert main(["train", str(tmp_path / "cfg.yaml"), "--resume", "latest"]) == 0  # already done: no-op
    assert "nothing to do" in capsys.readouterr().out


def test_regulariser_gradients_are_clipped(setup):
    # Adam normalises the step, so only clipping to ~0 can freeze the regulariser's LoRA B (which starts at 0)
    from headsup_core.train.trainer import Trainer

    moved = {}
    for clip in (1e-12, 0.0):
        tr = Trainer(_cfg(setup, f"clip{clip}", max_grad_norm=clip))
        reg = tr.acc.unwrap_model(tr.reg).unet
        before = {n: p.detach().clone() for n, p in reg.named_parameters() if "lora_B" in n}
        tr.train(max_steps=1)
        moved[clip] = max((p - before[n]).abs().max().item() for n, p in reg.named_parameters() if n in before)
    assert moved[0.0] > 1e-4 and moved[1e-12] < 1e-6, moved


def test_per_image_prompts_from_manifest_tags(setup, tmp_path):
    from headsup_core.train.data import format_prompt, load_samples
    from headsup_core.train.trainer import Trainer

    assert format_prompt() == ", ," and format_prompt("a, b") == "a, b, ,"
    recs = [json.loads(x) for x in Path(setup["manifest"]).read_text().splitlines()]
    recs[0]["tags"] = ["woman", "smile"]
    man = tmp_path / "manifest.jsonl"
    man.write_text("".join(json.dumps(r) + "\n" for r in recs))
    tags = {s.path: s.tags for s in load_samples(man)}
    assert tags[recs[0]["path"]] == "woman, smile" and "" in tags.values()

    tr = Trainer(_cfg(setup, "tags"))
    pipe = tr._prompt_pipe
    assert torch.allclose(tr.prompt_embeds, pipe.encode_prompt(", ,"))
    emb = tr.prompt_embeds_for(["woman, smile", ""])
    assert emb.shape[0] == 2
    assert torch.allclose(emb[1:], tr.prompt_embeds)
    assert torch.allclose(emb[:1], pipe.encode_prompt("woman, smile, ,"))
    assert not torch.allclose(emb[0], emb[1])


def _face_sample(tmp_path, size=64):
    import numpy as np

    from headsup_core.train.data import Sample

    img_dir = Path(resources.files("insightface").joinpath("data/images"))
    Image.open(img_dir / "Tom_Hanks_54745.png").convert("RGB").resize((size, size), Image.BICUBIC) \
        .save(tmp_path / "tom.png")
    arc = np.array([[38.29, 51.70], [73.53, 51.50], [56.03, 71.74], [41.55, 92.37], [70.73, 92.20]]) * size / 112
    return Sample(str(tmp_path / "tom.png"), [{"bbox": [8.0, 10.0, 58.0, 62.0], "kps": arc.tolist()}])


def test_horizontal_flip_mirrors_image_faces_and_mask(tmp_path):
    from headsup_core.train.data import PortraitCrops

    s = _face_sample(tmp_path)
    plain = PortraitCrops([s], 64, 4, 0.0, 1.0, 4, flip_prob=0.0)[(0, 3)]
    flip = PortraitCrops([s], 64, 4, 0.0, 1.0, 4, flip_prob=1.0)[(0, 3)]
    assert torch.equal(flip["gt"], torch.flip(plain["gt"], [-1]))
    assert torch.allclose(flip["boxes"][0], torch.tensor([64 - 58.0, 10.0, 64 - 8.0, 62.0]))
    assert (flip["mask"] - torch.flip(plain["mask"], [-1])).abs().mean() < 0.03
    assert not torch.equal(flip["mask"], plain["mask"])  # the face is off-centre: the flip moved it


def test_self_reference_is_warped_jittered_and_aligned(tmp_path):
    from headsup_core.train.data import PortraitCrops

    s = _face_sample(tmp_path, 128)
    ds = PortraitCrops([s], 128, 4, 0.0, 1.0, 4, flip_prob=0.0, self_ref=True)
    a, b = ds[(0, 1)], ds[(0, 2)]
    assert a["has_ref"] and b["has_ref"] and not PortraitCrops([s], 128, 4, 1.0, 1.0, 4, self_ref=True)[(0, 1)][
        "has_ref"]
    inside = a["mask"][0] > 0.9
    gt = a["gt"] * 2 - 1
    err_a = (a["canvas"] - gt).abs()[:, inside].mean()
    assert err_a < 0.25  # the reference lands on the face (up to warp noise and jitter)
    assert (a["canvas"] - gt).abs()[:, inside].mean() > 0.01  # but it is not the GT pixels
    assert not torch.equal(a["canvas"], b["canvas"])  # a new warp/jitter per sample seed
