"""Toy study on real faces (CPU): do references restore held-out faces, and do the face losses help faces?

One command runs everything (``python bench/train_toy.py``); stages are cached in ``--out`` so a re-run resumes.

1. **Data.** Real photos that ship in installed packages; faces, landmarks and identity descriptors from dlib
   (``headsup_core.faces``, backend ``dlib``). Training people: the left part of insightface's ``t1.jpg``
   (3 people), scikit-image's astronaut and matplotlib's Grace Hopper. Held out: the right part of ``t1.jpg``
   (3 other people).
2. **Base (stand-in for SD2.1 + OSEDiff).** A small SD2-shaped VAE and UNet (``TOY_VAE``/``TOY_UNET``, GroupNorm,
   cross-attention) with make-tiny's text encoder. The VAE is fitted as an autoencoder and the 4-channel UNet is
   fully trained for one-step SR (latent MSE) on the training photos, once, shared by every run.
3. **Arms**, the same seeds, steps, data order and degradations (``headsup_core.train.Trainer``: LoRA on the VAE
   encoder and UNet + full 9-channel ``conv_in``):
   * ``R``: reference = the same person's GT face under a random similarity warp, landmark noise and colour
     jitter (``train.data.self_reference``), reference dropout 0.2; face losses on.
   * ``N``: as R with the reference always dropped (the face mask stays).
   * ``R-noface``: as R with the face losses off (arm F: R vs R-noface).
   Face losses: MSE 1, LPIPS 0.8, identity 4. No differentiable identity network with weights is installable
   offline, so identity (and LPIPS) use the trainer's frozen *random* stand-ins (``arcface_tiny``,
   ``lpips_random``); the identity *metric* is dlib's real ResNet descriptor. VSD is off (no diffusion prior).
4. **Measures** on fixed held-out crops every ``--eval-every`` steps: face-region PSNR (pixels inside the GT
   face boxes), background PSNR (outside the face mask), whole-image PSNR, face LPIPS* (random backbone), dlib
   identity cosine between SR and GT faces. Arm R is evaluated with references, N without.

Writes ``results.json`` (per arm, per seed, per eval step), ``curves.png`` and a markdown table; ``--publish``
copies the JSON and the plot into ``docs/``.
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
ARMS = {"R": {"ref": True, "face": True}, "N": {"ref": False, "face": True}, "R-noface": {"ref": True, "face": False}}
T1_SPLIT = 700  # t1.jpg columns [0, 700) train, [700, 1280) held out (different people)


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ------------------------------------------------------------------------------------------------ data
def source_photos() -> list[tuple[str, np.ndarray, str]]:
    import matplotlib
    import skimage.data

    ins = Path(resources.files("insightface").joinpath("data/images"))
    t1 = np.asarray(Image.open(ins / "t1.jpg").convert("RGB"))
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return [("t1_left", t1[:, :T1_SPLIT], "train"), ("astronaut", skimage.data.astronaut(), "train"),
            ("grace_hopper", np.asarray(Image.open(hopper).convert("RGB")), "train"),
            ("t1_right", t1[:, T1_SPLIT:], "test")]


def prepare_data(work: Path) -> Path:
    from headsup_core.faces import load_face_analyzer

    man = work / "manifest.jsonl"
    if man.is_file():
        return man
    an = load_face_analyzer("dlib")
    (work / "img").mkdir(parents=True, exist_ok=True)
    recs = []
    for name, rgb, split in source_photos():
        path = work / "img" / f"{name}.png"
        Image.fromarray(np.ascontiguousarray(rgb)).save(path)
        faces = []
        for f in an.detect(rgb):
            eye = float(np.linalg.norm(f.kps[1] - f.kps[0]))
            if eye < 25 or f.det_score < 0.6:  # dlib's HOG also fires on the astronaut's mission patch
                continue
            faces.append({"bbox": [float(v) for v in f.bbox], "kps": np.asarray(f.kps).tolist(),
                          "eye_distance": eye, "det_score": float(f.det_score)})
        recs.append({"path": str(path), "status": "kept", "split": split, "faces": faces,
                     "width": rgb.shape[1], "height": rgb.shape[0]})
    man.write_text("".join(json.dumps(r) + "\n" for r in recs))
    log("data:", ", ".join(f"{Path(r['path']).stem} ({r['split']}, {len(r['faces'])} faces)" for r in recs))
    return man


def _train_images(manifest: Path) -> tuple[list[np.ndarray], list[dict]]:
    recs = [json.loads(x) for x in manifest.read_text().splitlines()]
    return [np.asarray(Image.open(r["path"]).convert("RGB")) for r in recs if r["split"] == "train"], \
        [r for r in recs if r["split"] == "train"]


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


# ------------------------------------------------------------------------------------------------ evaluation
def eval_items(manifest: Path, gt: int, n_per_face: int, with_ref: bool) -> list[dict]:
    """Fixed held-out crops (the same crops, references and degradations for every arm and seed)."""
    from headsup_core.train.data import PortraitCrops, load_samples

    ds = PortraitCrops(load_samples(manifest, (), "test"), gt, 4, 0.0 if with_ref else 1.0, 1.0, 8,
                       flip_prob=0.0, self_ref=True)
    return [ds[(0, 50_000 + i)] for i in range(n_per_face)]


def _psnr(a, b, m=None):
    d = (a - b) ** 2
    mse = d.mean() if m is None else (d * m).sum() / (m.sum() * a.shape[1]).clamp_min(1)
    return 10 * math.log10(1.0 / max(float(mse), 1e-10))


@torch.no_grad()
def evaluate(tr, items, analyzer, lpips) -> dict:
    from headsup_core.train.data import collate
    from headsup_core.train.losses import crop_faces

    gen = tr.acc.unwrap_model(tr.generator)
    was = gen.training
    gen.eval()
    res = {k: [] for k in ("psnr", "face_psnr", "bg_psnr", "face_lpips", "id_sim", "bicubic_face_psnr")}
    with torch.random.fork_rng():
        for i, it in enumerate(items):
            b = collate([it])
            gt = b["gt"]
            lq = tr.make_lq(gt, step=i, salt=99991, base_seed=0, resize_mode="bicubic")
            _, sr = gen(lq * 2 - 1, b["canvas"], b["mask"], b["has_ref"], tr.prompt_embeds, b["ref_windows"])
            sr = ((sr.float() + 1) / 2).clamp(0, 1)
            boxes = b["faces"]["boxes"]
            face_m = torch.zeros_like(gt[:, :1])
            for _, x0, y0, x1, y1 in boxes.tolist():
                face_m[..., int(y0):int(math.ceil(y1)), int(x0):int(math.ceil(x1))] = 1
            res["psnr"].append(_psnr(sr, gt))
            res["bg_psnr"].append(_psnr(sr, gt, (b["mask"] == 0).float()))
            if len(boxes):
                res["face_psnr"].append(_psnr(sr, gt, face_m))
                res["bicubic_face_psnr"].append(_psnr(lq, gt, face_m))
                res["face_lpips"].append(float(lpips(crop_faces(sr * 2 - 1, boxes, 64),
                                                     crop_faces(gt * 2 - 1, boxes, 64))))
                kps = it["kps"]
                u8 = lambda t: (t[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # noqa: E731
                for k in kps:
                    e_sr, e_gt = analyzer.embed(u8(sr), k), analyzer.embed(u8(gt), k)
                    if e_sr is not None and e_gt is not None:
                        res["id_sim"].append(float(np.dot(e_sr, e_gt)))
    gen.train(was)
    return {k: float(np.mean(v)) for k, v in res.items() if v}


def _items_with_kps(items):
    """Face landmarks of each eval crop (recovered from the stored 5-point ArcFace alignment matrices)."""
    arc = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                    [70.7299, 92.2041]], np.float64)
    for it in items:
        kps = []
        for m in it["align"].numpy().astype(np.float64):
            inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
            kps.append((arc @ inv[:, :2].T + inv[:, 2]).astype(np.float32))
        it["kps"] = kps
    return items


# ------------------------------------------------------------------------------------------------ runs
def run_arm(base: Path, manifest: Path, out: Path, arm: str, seed: int, a, evals, analyzer) -> dict:
    from headsup_core.train.config import load_train_config
    from headsup_core.train.trainer import Trainer

    spec = ARMS[arm]
    fw = {"face_mse": 1.0, "face_lpips": 0.8, "face_id": 4.0} if spec["face"] else \
        {"face_mse": 0.0, "face_lpips": 0.0, "face_id": 0.0}
    cfg = load_train_config(resources.files("headsup_core").joinpath("configs/train_tiny.yaml"), {
        "base": str(base), "output_dir": str(out), "seed": seed, "keep_states": 1,
        "model": {"rank_unet": a.rank, "rank_vae": a.rank},
        "optim": {"lr": a.lr, "lr_warmup_steps": 0},
        "losses": {"vsd": 0.0, "vsd_lora": 0.0, "lpips": 1.0, "face_adv": 0.0, "face_crop_size": 48, **fw},
        "data": {"manifest": str(manifest), "gt_size": a.gt_size, "batch_size": a.batch, "face_crop_prob": 0.8,
                 "ref_dropout": 0.2 if spec["ref"] else 1.0, "self_reference": True, "min_eye_distance": 8},
        "stages": [{"name": "main", "steps": a.steps}], "log_every": 0, "val_every": 0, "save_every": 0})
    tr = Trainer(cfg)
    items = evals["ref" if spec["ref"] else "noref"]
    curve = [{"step": 0, **evaluate(tr, items, analyzer, tr.lpips)}]
    t0 = time.time()
    losses = []
    while tr.step < a.steps:
        hist = tr.train(max_steps=min(a.steps, tr.step + a.eval_every))
        losses += [h["total"] for h in hist]
        curve.append({"step": tr.step, **evaluate(tr, items, analyzer, tr.lpips)})
        log(f"{arm} seed {seed} step {tr.step}: " + " ".join(f"{k}={v:.3f}" for k, v in curve[-1].items()
                                                              if k != "step"))
    r = {"arm": arm, "seed": seed, "curve": curve, "final": curve[-1], "train_s": time.time() - t0,
         "loss_first": float(np.mean(losses[:10])), "loss_last": float(np.mean(losses[-10:]))}
    if spec["ref"]:  # the same model with no reference at test time
        r["final_without_reference"] = evaluate(tr, evals["noref"], analyzer, tr.lpips)
    shutil.rmtree(out / "state", ignore_errors=True)
    return r


def summarise(results: list[dict]) -> str:
    keys = [("face_psnr", "face PSNR (dB)"), ("bg_psnr", "background PSNR (dB)"), ("psnr", "image PSNR (dB)"),
            ("face_lpips", "face LPIPS*"), ("id_sim", "dlib ID cosine")]

    def ms(v):
        return f"{statistics.mean(v):.3f} ± {statistics.pstdev(v):.3f}" if v else "-"

    lines = ["| arm | " + " | ".join(k[1] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for arm in ARMS:
        rs = [r for r in results if r["arm"] == arm]
        if rs:
            lines.append(f"| {arm} | " + " | ".join(ms([r["final"][k] for r in rs if k in r["final"]])
                                                    for k, _ in keys) + " |")
    first = results[0]["curve"][0]
    lines.append("| step 0 (R init) | " + " | ".join(f"{first.get(k, float('nan')):.3f}" for k, _ in keys) + " |")
    rs = [r for r in results if r["arm"] == "R" and "final_without_reference" in r]
    if rs:
        lines.append("| R, no reference at test | " + " | ".join(
            ms([r["final_without_reference"][k] for r in rs if k in r["final_without_reference"]])
            for k, _ in keys) + " |")
    bic = [r["final"].get("bicubic_face_psnr") for r in results if "bicubic_face_psnr" in r["final"]]
    if bic:
        lines.append(f"\nbicubic face PSNR (same crops): {bic[0]:.3f} dB")
    for a, b in (("R", "N"), ("R", "R-noface")):
        for k in ("face_psnr", "bg_psnr", "id_sim"):
            d = [ra["final"][k] - rb["final"][k] for ra in results if ra["arm"] == a
                 for rb in results if rb["arm"] == b and rb["seed"] == ra["seed"] and k in ra["final"]]
            if d:
                lines.append(f"{a} - {b} {k}: {ms(d)} (per seed: {', '.join(f'{x:+.3f}' for x in d)})")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("face_psnr", "face PSNR (dB)"), ("bg_psnr", "background PSNR (dB)"), ("psnr", "image PSNR (dB)"),
            ("face_lpips", "face LPIPS* (random net)"), ("id_sim", "dlib identity cosine")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4))
    colours = {"R": "tab:green", "N": "tab:red", "R-noface": "tab:blue"}
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
    fig.suptitle("Toy study, held-out people (mean ± std over seeds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/train_toy", help="work folder (cached stages, runs, results)")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=150, help="training steps per run")
    ap.add_argument("--eval-every", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--gt-size", type=int, default=96)
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (OSEDiff: 4)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--base-size", type=int, default=128, help="crop size of the base pretraining")
    ap.add_argument("--vae-steps", type=int, default=400)
    ap.add_argument("--unet-steps", type=int, default=300)
    ap.add_argument("--eval-crops", type=int, default=8)
    ap.add_argument("--base-only", action="store_true", help="stop after the data and the pretrained base")
    ap.add_argument("--publish", action="store_true", help="copy results and plot into docs/")
    a = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(a.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    manifest = prepare_data(work)
    base = build_base(work, manifest, a.vae_steps, a.unet_steps, a.base_size, 6)
    if a.base_only:
        return 0
    from headsup_core.faces import load_face_analyzer

    analyzer = load_face_analyzer("dlib")
    evals = {k: _items_with_kps(eval_items(manifest, a.gt_size, a.eval_crops, k == "ref")) for k in ("ref", "noref")}
    res_file = work / "results.json"
    results = json.loads(res_file.read_text())["runs"] if res_file.is_file() else []
    for seed in a.seeds:
        for arm in a.arms:
            if any(r["arm"] == arm and r["seed"] == seed for r in results):
                continue
            r = run_arm(base, manifest, work / f"run_{arm}_s{seed}", arm, seed, a, evals, analyzer)
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
        slim = {"config": {k: v for k, v in vars(a).items() if k not in ("out", "publish")}, "runs": results}
        (root / "docs" / "results").mkdir(exist_ok=True)
        (root / "docs" / "results" / "train_toy.json").write_text(json.dumps(slim, indent=1))
        (root / "docs" / "images").mkdir(exist_ok=True)
        shutil.copy(work / "curves.png", root / "docs" / "images" / "train_toy_curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
