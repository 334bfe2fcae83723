"""Toy proof of the trainer on CPU (defaults: 14 minutes on 2 busy cores).

* Base: ``headsup make-tiny``'s random SD2-shaped UNet/VAE. A random VAE cannot reconstruct anything, so its
  autoencoder is first fitted for ``--vae-steps`` on the training photos (a stand-in for a pretrained base).
* Data: real photos that ship in packages: insightface's ``t1.jpg`` (six people) and masked-face photos,
  ``Tom_Hanks_54745.png``, scikit-image's astronaut, chelsea, coffee, rocket. Faces are found with
  scikit-image's LBP frontal-face cascade (a real detector that ships with the package); landmarks are placed
  from the box with the ArcFace template, since no landmark model ships offline. Held out: the right half of
  ``t1.jpg`` (people not seen in training).
* Ablation: the same runs (same seeds, same data order, same degradations) with and without the face losses;
  held-out metrics before and after, including face-region PSNR.
* Limits: LPIPS and ArcFace are random networks (their weights cannot be downloaded here), and VSD is off (a
  random tiny UNet is no prior), so this checks the machinery and the direction of the face terms, not quality.

Run: ``python bench/train_toy.py [--steps 40] [--vae-steps 150] [--seeds 0 1 2] [--out out/train_toy]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ARC = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                [70.7299, 92.2041]], np.float32) / 112.0


def photos() -> dict[str, np.ndarray]:
    import skimage.data as sd

    d = Path(resources.files("insightface").joinpath("data/images"))
    out = {p.stem: np.asarray(Image.open(p).convert("RGB")) for p in sorted(d.iterdir())
           if p.suffix in (".jpg", ".png")}
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        out[name] = getattr(sd, name)()
    return out


def detect_faces(rgb: np.ndarray, min_size: int = 40) -> list[dict]:
    from skimage.color import rgb2gray
    from skimage.data import lbp_frontal_face_cascade_filename
    from skimage.feature import Cascade

    det = Cascade(lbp_frontal_face_cascade_filename())
    raw = det.detect_multi_scale(img=rgb2gray(rgb), scale_factor=1.2, step_ratio=1, min_size=(min_size, min_size),
                                 max_size=(400, 400))
    boxes = sorted(([f["c"], f["r"], f["c"] + f["width"], f["r"] + f["height"]] for f in raw),
                   key=lambda b: -(b[2] - b[0]))
    kept = []
    for b in boxes:  # drop boxes overlapping a larger kept one (the cascade reports several per face)
        if all(min(b[2], k[2]) - max(b[0], k[0]) <= 0 or min(b[3], k[3]) - max(b[1], k[1]) <= 0 for k in kept):
            kept.append(b)
    faces = []
    for x0, y0, x1, y1 in kept:
        kps = ARC * [x1 - x0, y1 - y0] + [x0, y0]
        faces.append({"bbox": [float(v) for v in (x0, y0, x1, y1)], "kps": kps.tolist(),
                      "eye_distance": float(np.linalg.norm(kps[1] - kps[0])), "det_score": 1.0})
    return faces


def write_data(work: Path) -> Path:
    """Photos -> PNGs + a builder-style manifest (train / identity-disjoint test)."""
    (work / "img").mkdir(parents=True, exist_ok=True)
    recs = []
    for name, rgb in photos().items():
        parts = [(name, rgb, "train")]
        if name == "t1":  # left people train, right people test
            parts = [("t1_left", rgb[:, :640], "train"), ("t1_right", rgb[:, 640:], "test")]
        for n, im, split in parts:
            p = work / "img" / f"{n}.png"
            Image.fromarray(np.ascontiguousarray(im)).save(p)
            faces = detect_faces(im)
            recs.append({"path": str(p), "status": "kept", "split": split, "faces": faces,
                         "width": im.shape[1], "height": im.shape[0]})
    man = work / "manifest.jsonl"
    man.write_text("".join(json.dumps(r) + "\n" for r in recs))
    print("data:", ", ".join(f"{Path(r['path']).stem}({r['split']}, {len(r['faces'])} faces)" for r in recs))
    return man


def pretrain_vae(base: Path, manifest: Path, steps: int, size: int = 64, seed: int = 0):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(base / "vae")
    imgs = [np.asarray(Image.open(json.loads(line)["path"]).convert("RGB"))
            for line in manifest.read_text().splitlines() if json.loads(line)["split"] == "train"]
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    vae.train()
    t0 = time.time()
    for step in range(steps):
        batch = []
        for _ in range(8):
            im = imgs[rng.integers(len(imgs))]
            y, x = rng.integers(0, im.shape[0] - size + 1), rng.integers(0, im.shape[1] - size + 1)
            batch.append(torch.from_numpy(im[y:y + size, x:x + size].copy()).permute(2, 0, 1).float() / 127.5 - 1)
        x = torch.stack(batch)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mode()).sample
        loss = torch.nn.functional.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  vae step {step}: mse {loss.item():.4f}  ({time.time() - t0:.0f} s)")
    vae.eval().save_pretrained(base / "vae", safe_serialization=True)


def run(base: Path, manifest: Path, out: Path, seed: int, face: bool, steps: int, gt: int, batch: int = 4) -> dict:
    from headsup_core.train.config import load_train_config
    from headsup_core.train.trainer import Trainer
    from headsup_core.train.validate import evaluate, validation_items

    face_w = {"face_mse": 1.0, "face_lpips": 0.8, "face_id": 4.0, "face_adv": 0.1} if face else \
        {"face_mse": 0.0, "face_lpips": 0.0, "face_id": 0.0, "face_adv": 0.0}
    cfg = load_train_config(resources.files("headsup_core").joinpath("configs/train_tiny.yaml"), {
        "base": str(base), "output_dir": str(out), "seed": seed,
        "optim": {"lr": 5e-4, "lr_reg": 5e-4, "lr_disc": 2e-4},
        "losses": {"vsd": 0.0, "vsd_lora": 0.0, **face_w},
        "data": {"manifest": str(manifest), "gt_size": gt, "batch_size": batch, "face_crop_prob": 0.7},
        "stages": [{"name": "main", "steps": steps}], "log_every": 0, "val_every": 0, "save_every": 0})
    tr = Trainer(cfg)
    items = validation_items(tr, 12)
    before = evaluate(tr, items)
    t0 = time.time()
    hist = tr.train()
    after = evaluate(tr, items, out / "val_after.png")
    return {"seed": seed, "face": face, "before": before, "after": after, "train_s": time.time() - t0,
            "final_loss": hist[-1]["total"], "n_val": len(items)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--vae-steps", type=int, default=150)
    ap.add_argument("--gt-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--out", default="out/train_toy")
    a = ap.parse_args(argv)
    from headsup_core.tiny import make_tiny

    work = Path(a.out).resolve()
    t0 = time.time()
    make_tiny(work / "tiny")
    manifest = write_data(work)
    pretrain_vae(work / "tiny" / "base", manifest, a.vae_steps)
    results = []
    for seed in a.seeds:
        for face in (False, True):
            r = run(work / "tiny" / "base", manifest, work / f"run_s{seed}_{'face' if face else 'noface'}", seed,
                    face, a.steps, a.gt_size, a.batch)
            results.append(r)
            print(f"seed {seed} face={face}: before {fmt(r['before'])} | after {fmt(r['after'])} "
                  f"({r['train_s']:.0f} s)", flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"total {time.time() - t0:.0f} s")
    return 0


def fmt(m: dict) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in m.items())


def table(results: list[dict]) -> str:
    def col(face, when, key):
        v = [r[when][key] for r in results if r["face"] == face and key in r[when]]
        return f"{statistics.mean(v):.3f} ± {statistics.pstdev(v):.3f}" if v else "-"

    lines = ["| run | val MSE before | val MSE after | PSNR after (dB) | LPIPS* after | face PSNR before (dB) "
             "| face PSNR after (dB) |", "|---|---|---|---|---|---|---|"]
    for face in (False, True):
        lines.append(f"| {'with' if face else 'without'} face losses | {col(face, 'before', 'mse')} | "
                     f"{col(face, 'after', 'mse')} | {col(face, 'after', 'psnr')} | {col(face, 'after', 'lpips')} | "
                     f"{col(face, 'before', 'face_psnr')} | {col(face, 'after', 'face_psnr')} |")
    per_seed = [f"seed {r['seed']} {'face' if r['face'] else 'no-face'}: face PSNR {r['after'].get('face_psnr', 0):.3f}"
                for r in results]
    return "\n".join(lines + [""] + per_seed)


if __name__ == "__main__":
    sys.exit(main())
