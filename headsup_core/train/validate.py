"""Periodic validation: fixed crops, fixed degradations, losses + face-region PSNR, and an image grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..eval.metrics import psnr


def validation_items(trainer, n: int | None = None) -> list[dict]:
    """The first ``n`` validation crops (test split of the manifest, else the training data), fixed seeds."""
    from .config import stage_plan
    from .data import PortraitCrops, load_samples, load_shard_samples

    d = stage_plan(trainer.cfg)[-1]["data"]
    if d.get("shards"):
        samples = load_shard_samples(d["shards"], "test")[0] or load_shard_samples(d["shards"], "train")[0]
    else:
        samples = load_samples(d.get("manifest"), (), "test") if d.get("manifest") else []
        samples = samples or load_samples(d.get("manifest"), d.get("folders") or (), "train")
    ds = PortraitCrops(samples, d["gt_size"], d["scale"], 0.0, 1.0, d["min_eye_distance"], flip_prob=0.0,
                       self_ref=d.get("self_reference", False))
    n = min(n or trainer.cfg["val_images"], len(ds))
    return [ds[(i, 10_000 + i)] for i in range(n)]


def face_psnr(sr01: torch.Tensor, gt01: torch.Tensor, boxes: torch.Tensor, size: int = 64) -> float | None:
    from .losses import crop_faces

    if boxes.numel() == 0:
        return None
    return psnr(crop_faces(sr01, boxes, size), crop_faces(gt01, boxes, size), min_mse=1e-10)


@torch.no_grad()
def evaluate(trainer, items: list[dict], save_to=None) -> dict:
    """Mean MSE / LPIPS / PSNR / face PSNR of the current generator on ``items``. RNG state is untouched."""
    from .data import collate

    gen = trainer.acc.unwrap_model(trainer.generator)
    was_training = gen.training
    gen.eval()
    dev = trainer.acc.device
    totals: dict[str, list[float]] = {"mse": [], "psnr": [], "face_psnr": []}
    if trainer.lpips is not None:
        totals["lpips"] = []
    rows = []
    with torch.random.fork_rng(devices=[] if dev.type == "cpu" else [dev]):
        for i, it in enumerate(items):
            b = collate([it])
            gt = b["gt"].to(dev)
            # the same LQ for every run and seed; bicubic, as inference
            lq_up = trainer.make_lq(gt, step=i, salt=99991, base_seed=0, resize_mode="bicubic")
            _, sr = gen(lq_up * 2 - 1, b["canvas"].to(dev), b["mask"].to(dev), b["has_ref"].to(dev),
                        trainer.prompt_embeds_for(b.get("tags")), b.get("ref_windows"))
            sr01 = ((sr.float() + 1) / 2).clamp(0, 1)
            mse = F.mse_loss(sr01, gt).item()
            totals["mse"].append(mse)
            totals["psnr"].append(psnr(sr01, gt, min_mse=1e-10))
            if trainer.lpips is not None:
                totals["lpips"].append(trainer.lpips(sr, gt * 2 - 1).item())
            fp = face_psnr(sr01, gt, b["faces"]["boxes"].to(dev))
            if fp is not None:
                totals["face_psnr"].append(fp)
            rows.append(torch.cat([lq_up, sr01, gt], dim=-1)[0].cpu())
    gen.train(was_training)
    if save_to is not None and rows:
        from PIL import Image

        grid = torch.cat(rows, dim=-2).permute(1, 2, 0).mul(255).round().byte().numpy()
        save_to.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(save_to)
    return {k: sum(v) / len(v) for k, v in totals.items() if v}


def validate(trainer) -> dict:
    if not hasattr(trainer, "_val_items"):
        trainer._val_items = validation_items(trainer)
    return evaluate(trainer, trainer._val_items, trainer.out / "val" / f"step_{trainer.step:07d}.png")
