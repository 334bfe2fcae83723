"""Toy study on real pairs (CPU): do references of *another photo of the same person* restore held-out faces,
and does face supervision (the identity loss with dlib's ResNet in torch) help?

One command runs everything (``python bench/train_toy.py``); stages are cached in ``--out`` so a re-run resumes.

1. **Data.** ``../shared/data/faces-deepface/`` (13 people, 2-8 photos each, ``identities.csv``), prepared by
   ``headsup_core.eval.arms.prepare_pairs``: dlib faces, photos shrunk so the largest face is <= 100 px, and
   ``pairs.jsonl`` pairing each photo's face with every other photo of the same person (as PortraitSR-4K pairs).
   People ``--test-ids`` (all their photos) are held out; single-photo identities train without references.
2. **Base (stand-in for SD2.1 + OSEDiff).** A small SD2-shaped VAE and UNet (``TOY_VAE``/``TOY_UNET``) with
   make-tiny's text encoder, fitted once on the training photos (VAE as an autoencoder, then the 4-channel UNet
   for one-step SR in latent space); every run starts from it.
3. **Arms** (``headsup_core.train.Trainer``: LoRA on the VAE encoder and UNet + full 9-channel ``conv_in``), the
   same seeds, steps, data order and degradations; LPIPS is **off** everywhere (no real LPIPS weights here):
   * ``R``: reference on (dropout 0.2), face supervision on: face MSE 1 + identity 4 (dlib torch ResNet);
   * ``N``: R with the reference always dropped (the face mask stays);
   * ``F0``: R with the face losses off;
   * ``F-id``: F0 plus only the identity loss (weight 4, dlib torch ResNet).
4. **Measures** on fixed held-out crops (``headsup_core.eval.arms.evaluate``): face-region PSNR and SSIM,
   background PSNR, whole-crop PSNR; at the end, identity cosine SR-vs-GT with dlib's C++ descriptor and its
   torch port. Reference arms are evaluated with references (and once without).

Each trained arm is saved in ``--out``/arms/ARM_sSEED (``weights.safetensors`` + ``arm.json``); ``headsup
eval-arms`` measures saved arms on any folder with an ``identities.csv``. Writes ``results.json``, ``curves.png``
and ``table.md``; ``--publish`` copies the JSON and the plot into ``docs/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

TOY_VAE = {"block_out_channels": [16, 32, 64, 64], "layers_per_block": 1, "latent_channels": 4,
           "norm_num_groups": 8, "down_block_types": ["DownEncoderBlock2D"] * 4,
           "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3, "out_channels": 3, "sample_size": 128,
           "scaling_factor": 0.18215}
TOY_UNET = {"block_out_channels": [64, 128], "layers_per_block": 1, "cross_attention_dim": 32,
            "attention_head_dim": [4, 8], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "in_channels": 4, "out_channels": 4,
            "sample_size": 16, "norm_num_groups": 16, "use_linear_projection": True}
ARMS = {"R": {"ref": True, "face_mse": 1.0, "face_id": 4.0}, "N": {"ref": False, "face_mse": 1.0, "face_id": 4.0},
        "F0": {"ref": True, "face_mse": 0.0, "face_id": 0.0}, "F-id": {"ref": True, "face_mse": 0.0, "face_id": 4.0}}
DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "faces-deepface"
TEST_IDS = ["3", "5", "7", "8"]  # 6 + 5 + 4 + 4 photos; every other person trains


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ------------------------------------------------------------------------------------------------ data
def _train_images(manifest: Path) -> tuple[list[np.ndarray], list[dict]]:
    recs = [json.loads(x) for x in manifest.read_text().splitlines()]
    recs = [r for r in recs if r["split"] == "train"]
    return [np.array(Image.open(r["path"]).convert("RGB")) for r in recs], recs


def _random_crops(imgs, recs, rng, n, size, face_prob=0.7):
    out = []
    for _ in range(n):
        i = int(rng.integers(len(imgs)))
        im, faces = imgs[i], recs[i]["faces"]
        big = max((f["bbox"][2] - f["bbox"][0] for f in faces), default=0)
        zoom = float(np.clip(0.6 * size / big, size / min(im.shape[:2]), 1.0)) if big else 1.0
        zoom *= float(rng.uniform(0.8, 1.2)) if zoom * 0.8 * min(im.shape[:2]) > size else 1.0
        t = torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255
        if zoom != 1.0:
            t = F.interpolate(t, scale_factor=zoom, mode="area" if zoom < 1 else "bicubic",
                              recompute_scale_factor=False)
        h, w = t.shape[-2:]
        if faces and rng.random() < face_prob:
            f = faces[int(rng.integers(len(faces)))]
            cx = (f["bbox"][0] + f["bbox"][2]) / 2 * zoom + rng.uniform(-0.2, 0.2) * size
            cy = (f["bbox"][1] + f["bbox"][3]) / 2 * zoom + rng.uniform(-0.2, 0.2) * size
            x0, y0 = int(np.clip(cx - size / 2, 0, w - size)), int(np.clip(cy - size / 2, 0, h - size))
        else:
            x0, y0 = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
        c = t[..., y0:y0 + size, x0:x0 + size]
        out.append(torch.flip(c, [-1]) if rng.random() < 0.5 else c)
    return torch.cat(out).clamp(0, 1)


def build_base(work: Path, manifest: Path, vae_steps: int, unet_steps: int, size: int, batch: int) -> Path:
    """make-tiny's text encoder/tokenizer/scheduler + the toy VAE/UNet, pretrained on the training photos."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from headsup_core.testing.tiny_models import make_tiny

    base = work / "tiny" / "base"
    done = work / "base_done.json"
    if done.is_file():
        return base
    make_tiny(work / "tiny")
    torch.manual_seed(0)
    vae, unet = AutoencoderKL(**TOY_VAE), UNet2DConditionModel(**TOY_UNET)
    imgs, recs = _train_images(manifest)
    rng = np.random.default_rng(0)
    t0 = time.time()
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    for step in range(vae_steps):
        x = _random_crops(imgs, recs, rng, batch, size) * 2 - 1
        post = vae.encode(x).latent_dist
        loss = F.mse_loss(vae.decode(post.mode()).sample, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == vae_steps - 1:
            log(f"vae {step}: mse {loss.item():.4f} ({time.time() - t0:.0f} s)")
    vae.eval().requires_grad_(False)
    # one-step SR pretraining of the 4-channel UNet (an OSEDiff stand-in): x0 from the LQ latent -> GT latent
    from headsup_core.degradations import RealESRGANDegradation
    from headsup_core.model import alpha_bar

    deg = RealESRGANDegradation()
    text = json.loads((base / "text_encoder" / "config.json").read_text())
    assert text["hidden_size"] == TOY_UNET["cross_attention_dim"]
    from headsup_core.loading.base import load_base
    from headsup_core.model import HeadsUpModel
    from headsup_core.pipeline import HeadsUpPipeline

    tiny = load_base(str(base))
    emb = HeadsUpPipeline(HeadsUpModel(tiny.vae, tiny.unet, "epsilon", 999), tiny.text_encoder_loader) \
        .encode_prompt(", ,").detach()
    a = alpha_bar(999)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0)
    t999 = torch.full((batch,), 999, dtype=torch.long)
    for step in range(unet_steps):
        gt = _random_crops(imgs, recs, rng, batch, size)
        lq = deg(gt, seed=step)
        lq = F.interpolate(lq, size=gt.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
        with torch.no_grad():
            z = vae.encode(lq * 2 - 1).latent_dist.mode() * 0.18215
            zt = vae.encode(gt * 2 - 1).latent_dist.mode() * 0.18215
        eps = unet(z, t999, encoder_hidden_states=emb.expand(batch, -1, -1)).sample
        x0 = (z - math.sqrt(1 - a) * eps) / math.sqrt(a)
        loss = F.mse_loss(x0, zt)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == unet_steps - 1:
            log(f"unet {step}: latent mse {loss.item():.4f} ({time.time() - t0:.0f} s)")
    vae.save_pretrained(base / "vae", safe_serialization=True)
    unet.eval().save_pretrained(base / "unet", safe_serialization=True)
    done.write_text(json.dumps({"vae_steps": vae_steps, "unet_steps": unet_steps, "seconds": time.time() - t0}))
    return base


# ------------------------------------------------------------------------------------------------ runs
def run_arm(base: Path, manifest: Path, work: Path, arm: str, seed: int, a, evals, judge, degrade) -> dict:
    """Train one arm for ``a.steps`` (evaluating every ``a.eval_every``), save it as ``arms/ARM_sSEED``."""
    from headsup_core.eval.arms import evaluate
    from headsup_core.train.config import load_train_config
    from headsup_core.train.trainer import Trainer

    spec = ARMS[arm]
    out = work / f"run_{arm}_s{seed}"
    cfg = load_train_config(resources.files("headsup_core").joinpath("configs/train_tiny.yaml"), {
        "base": str(base), "output_dir": str(out), "seed": seed, "keep_states": 1,
        "model": {"rank_unet": a.rank, "rank_vae": a.rank},
        "optim": {"lr": a.lr, "lr_warmup_steps": 0},
        "losses": {"vsd": 0.0, "vsd_lora": 0.0, "lpips": 0.0, "face_lpips": 0.0, "face_adv": 0.0,
                   "face_mse": spec["face_mse"], "face_id": spec["face_id"], "face_crop_size": 48,
                   "identity_net": "dlib", "arcface_tiny": False},
        "data": {"manifest": str(manifest), "gt_size": a.gt_size, "batch_size": a.batch, "face_crop_prob": 0.8,
                 "ref_dropout": 0.2 if spec["ref"] else 1.0, "self_reference": False, "min_eye_distance": 8},
        "stages": [{"name": "main", "steps": a.steps}], "log_every": 0, "val_every": 0, "save_every": 0})
    tr = Trainer(cfg)
    gen = tr.acc.unwrap_model(tr.generator)
    items = evals["ref" if spec["ref"] else "noref"]
    curve = [{"step": 0, **evaluate(gen, tr.prompt_embeds, items, degrade)}]
    t0, losses = time.time(), []
    while tr.step < a.steps:
        hist = tr.train(max_steps=min(a.steps, tr.step + a.eval_every))
        losses += [h["total"] for h in hist]
        last = tr.step >= a.steps
        curve.append({"step": tr.step, **evaluate(gen, tr.prompt_embeds, items, degrade, judge if last else None)})
        log(f"{arm} seed {seed} step {tr.step}: " + " ".join(f"{k}={v:.3f}" for k, v in curve[-1].items()
                                                              if k != "step"))
    r = {"arm": arm, "seed": seed, "curve": curve, "final": curve[-1], "train_s": time.time() - t0,
         "loss_first": float(np.mean(losses[:10])), "loss_last": float(np.mean(losses[-10:]))}
    if spec["ref"]:  # the same model with no reference at test time
        r["final_without_reference"] = evaluate(gen, tr.prompt_embeds, evals["noref"], degrade, judge)
    if arm == "R":  # diagnostic: the GT face itself (warped) as reference instead of another photo
        r["final_self_reference"] = evaluate(gen, tr.prompt_embeds, evals["self"], degrade, judge)
    arm_dir = work / "arms" / f"{arm}_s{seed}"
    arm_dir.mkdir(parents=True, exist_ok=True)
    tr.save_checkpoint(arm_dir / "weights.safetensors")
    (arm_dir / "arm.json").write_text(json.dumps({"arm": arm, "seed": seed, "steps": a.steps, **spec,
                                                  "base": "../../tiny/base"}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    return r


KEYS = [("face_psnr", "face PSNR (dB)"), ("face_ssim", "face SSIM"), ("bg_psnr", "background PSNR (dB)"),
        ("psnr", "image PSNR (dB)"), ("id_dlib", "ID cos, dlib C++"), ("id_torch", "ID cos, dlib torch")]
PAIRS = (("R", "N"), ("F-id", "F0"), ("R", "F0"))


def _ms(v):
    return f"{statistics.mean(v):.3f} ± {statistics.pstdev(v):.3f}" if v else "-"


def summarise(results: list[dict]) -> str:
    lines = ["| arm | " + " | ".join(k[1] for k in KEYS) + " |", "|---" * (len(KEYS) + 1) + "|"]
    for arm in ARMS:
        rs = [r for r in results if r["arm"] == arm]
        if rs:
            lines.append(f"| {arm} | " + " | ".join(_ms([r["final"][k] for r in rs if k in r["final"]])
                                                    for k, _ in KEYS) + " |")
    for key, what in (("final_without_reference", "no reference at test"),
                      ("final_self_reference", "GT face (warped) as reference")):
        rs = [r for r in results if key in r]
        for arm in [a for a in ARMS if any(r["arm"] == a for r in rs)]:
            lines.append(f"| {arm} model, {what} | " + " | ".join(
                _ms([r[key][k] for r in rs if r["arm"] == arm and k in r[key]]) for k, _ in KEYS) + " |")
    first = results[0]["curve"][0]
    lines.append("| step 0 (base) | " + " | ".join(f"{first[k]:.3f}" if k in first else "-" for k, _ in KEYS) + " |")
    bic = [r["final"]["bicubic_face_psnr"] for r in results if "bicubic_face_psnr" in r["final"]]
    if bic:
        lines.append(f"\nbicubic face PSNR (same crops): {bic[0]:.3f} dB")
    for a, b in PAIRS:
        for k, _ in KEYS:
            d = [ra["final"][k] - rb["final"][k] for ra in results if ra["arm"] == a
                 for rb in results if rb["arm"] == b and rb["seed"] == ra["seed"] and k in ra["final"]]
            if d:
                lines.append(f"{a} - {b} {k}: {_ms(d)} (per seed: {', '.join(f'{x:+.3f}' for x in d)})")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = KEYS[:4]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4))
    colours = {"R": "tab:green", "N": "tab:red", "F0": "tab:blue", "F-id": "tab:purple"}
    for ax, (k, label) in zip(axes, keys):
        for arm in ARMS:
            rs = [r for r in results if r["arm"] == arm]
            if not rs:
                continue
            steps = [c["step"] for c in rs[0]["curve"]]
            vals = np.array([[c.get(k, np.nan) for c in r["curve"]] for r in rs])
            m, s = vals.mean(0), vals.std(0)
            ax.plot(steps, m, label=arm, color=colours[arm])
            ax.fill_between(steps, m - s, m + s, color=colours[arm], alpha=0.2)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
    axes[0].legend()
    fig.suptitle("Toy study on real pairs, held-out people (mean ± std over seeds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="folder of photos with identities.csv (file,identity)")
    ap.add_argument("--test-ids", nargs="+", default=TEST_IDS, help="identities held out for evaluation")
    ap.add_argument("--out", default="out/train_toy", help="work folder (cached stages, runs, arms, results)")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=80, help="training steps per run")
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--gt-size", type=int, default=96)
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (OSEDiff: 4)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--base-size", type=int, default=96, help="crop size of the base pretraining")
    ap.add_argument("--vae-steps", type=int, default=200)
    ap.add_argument("--unet-steps", type=int, default=150)
    ap.add_argument("--eval-crops", type=int, default=1, help="fixed crops per held-out photo")
    ap.add_argument("--base-only", action="store_true", help="stop after the data and the pretrained base")
    ap.add_argument("--publish", action="store_true", help="copy results and plot into docs/")
    a = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(a.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    from headsup_core.degradations import RealESRGANDegradation
    from headsup_core.eval.arms import IdentityJudge, eval_items, prepare_pairs

    manifest = prepare_pairs(a.data, work / "data", a.test_ids, gt_size=a.gt_size, log=log)
    base = build_base(work, manifest, a.vae_steps, a.unet_steps, a.base_size, 6)
    if a.base_only:
        return 0
    evals = {k: eval_items(manifest, a.gt_size, k != "noref", a.eval_crops, k == "self")
             for k in ("ref", "noref", "self")}
    log(f"held out: {len(evals['ref'])} crops of people {', '.join(a.test_ids)}")
    judge, degrade = IdentityJudge(), RealESRGANDegradation()
    res_file = work / "results.json"
    results = json.loads(res_file.read_text())["runs"] if res_file.is_file() else []
    for seed in a.seeds:
        for arm in a.arms:
            if any(r["arm"] == arm and r["seed"] == seed for r in results):
                continue
            r = run_arm(base, manifest, work, arm, seed, a, evals, judge, degrade)
            results.append(r)
            res_file.write_text(json.dumps({"config": vars(a), "runs": results}, indent=1))
            log(f"done {arm} seed {seed} in {r['train_s']:.0f} s")
    table = summarise(results)
    (work / "table.md").write_text(table + "\n")
    plot(results, work / "curves.png")
    print(table)
    log(f"total {time.time() - t0:.0f} s")
    if a.publish:
        root = Path(__file__).resolve().parents[1]
        slim = {"config": {k: v for k, v in vars(a).items() if k not in ("out", "publish", "data")},
                "runs": results}
        (root / "docs" / "results").mkdir(exist_ok=True)
        (root / "docs" / "results" / "train_toy_pairs.json").write_text(json.dumps(slim, indent=1))
        (root / "docs" / "images").mkdir(exist_ok=True)
        shutil.copy(work / "curves.png", root / "docs" / "images" / "train_toy_pairs_curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
