"""``headsup train CONFIG.yaml``: OSEDiff-style one-step training with HeadsUp's face-aware conditioning.

Per step (as OSEDiff's ``train_osediff.py``, plus the face terms):
1. GT crops -> Real-ESRGAN LQ on the device -> bicubic back to GT size -> [-1, 1].
2. Generator (``HeadsUpGenerator``): VAE-encode LQ and the reference canvas, ``assemble_unet_input`` (the
   function inference uses), one UNet step at t=999, decode.
3. Generator loss: MSE + LPIPS + VSD + face MSE/LPIPS/identity/adversarial; AdamW on the VAE-encoder and UNet
   LoRA plus the full ``conv_in``.
4. Regulariser step: the VSD LoRA UNet's diffusion loss on the detached latents.
5. Face discriminator step on detached face crops.
Runs on accelerate (devices, mixed precision, multi-GPU); ``save_state``/``load_state`` give exact resume (models,
optimizers, schedulers, RNG, step); data order is a function of (seed, step) (``data.StepBatches``).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import HeadsUpError, MissingDependencyError
from ..model import HeadsUpModel
from .config import load_train_config, stage_plan  # noqa: F401  (re-exported for the CLI)
from .generator import HeadsUpGenerator

log = logging.getLogger(__name__)


class _Progress:
    """Registered with accelerate so the step is part of the saved state."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, sd):
        self.step = int(sd["step"])


def _trainable(named_params, keep) -> list[nn.Parameter]:
    out = []
    for n, p in named_params:
        p.requires_grad_(keep(n))
        if p.requires_grad:
            out.append(p)
    return out


class Trainer:
    def __init__(self, cfg: dict):
        try:
            from accelerate import Accelerator
            from accelerate.utils import ProjectConfiguration, set_seed
        except ImportError as e:
            raise MissingDependencyError("Training needs accelerate; run `pip install accelerate`.") from e
        self.cfg = cfg
        self.out = Path(cfg["output_dir"])
        self.out.mkdir(parents=True, exist_ok=True)
        trackers = None
        try:
            import tensorboard  # noqa: F401
            trackers = "tensorboard"
        except ImportError:
            log.info("tensorboard is not installed; losses are logged to the console and logs.jsonl only")
        self.acc = Accelerator(mixed_precision=cfg["mixed_precision"], cpu=cfg.get("device") == "cpu",
                               gradient_accumulation_steps=cfg["gradient_accumulation_steps"], log_with=trackers,
                               project_config=ProjectConfiguration(project_dir=str(self.out),
                                                                   logging_dir=str(self.out / "logs")))
        set_seed(cfg["seed"])
        self.progress = _Progress()
        self._build_models()
        self._build_losses()
        self._build_optim()
        self.acc.register_for_checkpointing(self.progress)
        if trackers:
            self.acc.init_trackers("headsup", config={k: str(v) for k, v in cfg.items() if not isinstance(v, dict)})
        if cfg.get("resume"):
            self.resume(cfg["resume"])

    # ---------------------------------------------------------------- setup
    def _build_models(self):
        from ..loading.base import load_base
        from ..loading.surgery import add_osediff_adapters, widen_conv_in
        from ..pipeline import HeadsUpPipeline
        from .init_weights import apply_init, load_init
        from .vsd import VSDRegulariser, alphas_cumprod_from_config

        c, mc = self.cfg, self.cfg["model"]
        base = load_base(c["base"])
        self.prediction_type = base.prediction_type
        unet_4ch = copy.deepcopy(base.unet)  # the regulariser is a plain SD UNet, as OSEDiff's
        init = load_init(c.get("init_weights"), self.out)
        widen_conv_in(base.unet, 9)
        rank_u, rank_v = (init.rank_unet, init.rank_vae) if init else (mc["rank_unet"], mc["rank_vae"])
        self.targets = add_osediff_adapters(base.unet, base.vae, rank_u, rank_v)
        if init:
            apply_init(base.unet, base.vae, init)
        self.model = HeadsUpModel(base.vae, base.unet, base.prediction_type, 999, sample_latent=mc["sample_latent"])
        gen_params = _trainable(base.unet.named_parameters(), lambda n: "lora_" in n or n.startswith("conv_in."))
        gen_params += _trainable(base.vae.named_parameters(), lambda n: "lora_" in n)
        self.gen_params = gen_params
        if c["gradient_checkpointing"]:
            base.unet.enable_gradient_checkpointing()
            base.vae.enable_gradient_checkpointing()
        from .data import format_prompt

        prompt_pipe = HeadsUpPipeline(self.model, base.text_encoder_loader)
        self._prompt_pipe, self._tag_cache = prompt_pipe, {}
        # OSEDiff's form f"{tags}, {prompt},"; this default (no tags) is what the checkpoint stores
        self.prompt_embeds = self._embed(prompt_pipe, format_prompt("", mc["prompt"]))
        if init is not None and init.prompt_embeds is not None and not mc["prompt"]:
            self.prompt_embeds = init.prompt_embeds.float()
        self.neg_embeds = self._embed(prompt_pipe, mc["neg_prompt"])
        self.reg = None
        if any(st["losses"]["vsd"] for st in stage_plan(c)):
            sched_file = Path(c["base"]) / "scheduler" / "scheduler_config.json"  # diffusers-folder bases
            ac = alphas_cumprod_from_config(json.loads(sched_file.read_text())) if sched_file.is_file() else None
            self.reg = VSDRegulariser(unet_4ch, rank=rank_u, prediction_type=base.prediction_type,
                                      alphas_cumprod=ac, cfg=c["losses"]["cfg_vsd"],
                                      gradient_checkpointing=c["gradient_checkpointing"])
        del unet_4ch
        self.generator = HeadsUpGenerator(self.model)

    def _embed(self, pipe, text):
        try:
            with torch.no_grad():
                return pipe.encode_prompt(text).detach().float()
        except HeadsUpError:
            log.warning("the base has no text encoder: training with an all-zero prompt embedding")
            return torch.zeros(1, 77, self.model.cross_attention_dim)

    def prompt_embeds_for(self, tags: list[str] | None) -> torch.Tensor:
        """Per-image prompt embeddings (Bx77xD) from the manifest's tags; images without tags get the default
        (``", ,"`` form). Encodings are cached per distinct string."""
        from .data import format_prompt

        if not tags or not any(tags):
            return self.prompt_embeds
        out = []
        for t in tags:
            if not t:
                out.append(self.prompt_embeds)
                continue
            if t not in self._tag_cache:
                self._tag_cache[t] = self._embed(self._prompt_pipe, format_prompt(t, self.cfg["model"]["prompt"]))
            out.append(self._tag_cache[t].to(self.prompt_embeds.device))
        return torch.cat(out)

    def _build_losses(self):
        from ..degradations import RealESRGANDegradation, load_degradation_config
        from .losses import LPIPSLoss, PatchDiscriminator, load_identity_loss_net

        lc, plan = self.cfg["losses"], stage_plan(self.cfg)
        self.degrade = RealESRGANDegradation(load_degradation_config(self.cfg["data"].get("degradation"),
                                                                     scale=self.cfg["data"]["scale"]))
        need_lpips = any(st["losses"]["lpips"] or st["losses"]["face_lpips"] for st in plan)
        self.lpips = LPIPSLoss(lc["lpips_net"], lc["lpips_backbone"], random=lc["lpips_random"]) if need_lpips \
            else None
        self.arcface = (load_identity_loss_net(lc.get("identity_net", "auto"), lc["arcface_weights"],
                                               tiny=lc["arcface_tiny"])
                        if any(st["losses"]["face_id"] for st in plan) else None)
        if self.arcface is not None:  # say which identity network (and licence) the identity loss uses
            log.info("identity loss network: %s", self.arcface.name)
        self.disc = PatchDiscriminator(lc["disc_channels"]) if any(st["losses"]["face_adv"] for st in plan) else None
        dev = self.acc.device
        for m in (self.lpips, self.arcface):
            if m is not None:
                m.to(dev)

    def _build_optim(self):
        from diffusers.optimization import get_scheduler

        o = self.cfg["optim"]

        def adamw(params, lr):
            return torch.optim.AdamW(params, lr=lr, betas=tuple(o["betas"]), weight_decay=o["weight_decay"])

        def sched(opt):
            return get_scheduler(o["lr_scheduler"], optimizer=opt, num_warmup_steps=o["lr_warmup_steps"],
                                 num_training_steps=sum(st["steps"] for st in stage_plan(self.cfg)))

        objs = [self.generator, adamw(self.gen_params, o["lr"])]
        objs.append(sched(objs[1]))
        if self.reg is not None:
            ropt = adamw(self.reg.lora_parameters(), o["lr_reg"])
            objs += [self.reg, ropt, sched(ropt)]
        if self.disc is not None:
            dopt = torch.optim.AdamW(self.disc.parameters(), lr=o["lr_disc"], betas=(0.5, 0.999))
            objs += [self.disc, dopt]
        prepared = iter(self.acc.prepare(*objs))
        self.generator, self.opt, self.sched = next(prepared), next(prepared), next(prepared)
        if self.reg is not None:
            self.reg, self.opt_reg, self.sched_reg = next(prepared), next(prepared), next(prepared)
        if self.disc is not None:
            self.disc, self.opt_disc = next(prepared), next(prepared)
        self.prompt_embeds = self.prompt_embeds.to(self.acc.device)
        self.neg_embeds = self.neg_embeds.to(self.acc.device)

    # ---------------------------------------------------------------- state
    @property
    def step(self) -> int:
        return self.progress.step

    def save_state(self) -> Path:
        path = self.out / "state" / f"step_{self.step:07d}"
        self.acc.save_state(str(path))
        if self.acc.is_main_process:
            states = sorted((self.out / "state").glob("step_*"))
            for old in states[: max(0, len(states) - int(self.cfg["keep_states"]))]:
                import shutil

                shutil.rmtree(old, ignore_errors=True)
        return path

    def resume(self, where):
        path = Path(where)
        if str(where) == "latest":
            states = sorted((self.out / "state").glob("step_*"))
            if not states:
                log.info("no saved state in %s; starting from step 0", self.out / "state")
                return
            path = states[-1]
        if not path.is_dir():
            raise HeadsUpError(f"Cannot resume: {path} is not a saved training state folder.")
        self.acc.load_state(str(path))
        log.info("resumed from %s at step %d", path, self.step)

    def save_checkpoint(self, path=None) -> Path:
        from ..loading.weights import save_headsup_checkpoint

        path = Path(path or self.out / "checkpoints" / f"headsup_step_{self.step:07d}.safetensors")
        model = self.acc.unwrap_model(self.generator).model
        meta = {"prediction_type": self.prediction_type, "trained_steps": self.step, "trainer": "headsup train",
                "degradation": "realesrgan-second-order", "ref_dropout": self.cfg["data"]["ref_dropout"],
                "losses": json.dumps({k: v for k, v in self.cfg["losses"].items() if isinstance(v, (int, float))}),
                "lora_targets_from": "headsup_core.loading.surgery.add_osediff_adapters"}
        if self.arcface is not None:  # which identity network supervised the faces (and its licence)
            meta["identity_loss_network"] = self.arcface.name
        if self.acc.is_main_process:
            save_headsup_checkpoint(path, model.unet, model.vae, meta, prompt_embeds=self.prompt_embeds.cpu())
        return path

    # ---------------------------------------------------------------- training
    def make_lq(self, gt: torch.Tensor, step: int, salt: int = 0, base_seed: int | None = None,
                resize_mode: str | None = None, seeds: list[int] | None = None) -> torch.Tensor:
        """Degraded LQ, resized back to GT size. Training (``resize_mode`` None) draws the resize-back mode per
        image and rounds to 8 bits, as OSEDiff; validation passes ``"bicubic"``, as inference upscales.
        ``seeds`` (training: the data's per-sample seeds): each image's LQ depends on its own seed only, so the
        same global batch gives the same LQ whatever the number of processes."""
        from ..degradations import resize_back

        if seeds is not None and resize_mode is None:
            outs = []
            for i, sd in enumerate(seeds):
                sd = (int(sd) * 7919 + salt) % 2**62
                lq = self.degrade(gt[i:i + 1], seed=sd)
                outs.append(resize_back(lq, gt.shape[-2:], seed=sd + 1, modes=self.degrade.cfg["resize_modes"]))
            return torch.cat(outs)

        base = self.cfg["seed"] if base_seed is None else base_seed
        seed = (base * 1_000_003 + step * 7919 + self.acc.process_index * 131 + salt) % 2**62
        lq = self.degrade(gt, seed=seed)
        if resize_mode is not None:
            return F.interpolate(lq, size=gt.shape[-2:], mode=resize_mode, align_corners=False).clamp(0, 1)
        return resize_back(lq, gt.shape[-2:], seed=seed + 1, modes=self.degrade.cfg["resize_modes"])

    def train_step(self, batch: dict, stage: dict) -> dict:
        from .losses import FaceLosses, discriminator_loss, image_losses

        w, dev = stage["losses"], self.acc.device
        gt = batch["gt"].to(dev)
        x_src, x_tgt = self.make_lq(gt, self.step, seeds=batch.get("seeds")) * 2 - 1, gt * 2 - 1
        faces = {k: v.to(dev) for k, v in batch["faces"].items()}
        embeds = self.prompt_embeds_for(batch.get("tags"))
        self.generator.train()
        logs = {}
        with self.acc.accumulate(self.generator):
            with self.acc.autocast():
                x0, sr = self.generator(x_src, batch["canvas"].to(dev), batch["mask"].to(dev),
                                        batch["has_ref"].to(dev), embeds, batch.get("ref_windows"))
                losses = image_losses(sr, x_tgt, self.lpips, w["mse"], w["lpips"])
                if w["vsd"] and self.reg is not None:
                    losses["vsd"] = self.acc.unwrap_model(self.reg).distribution_matching_loss(
                        x0, embeds, self.neg_embeds) * w["vsd"]
                face_l = FaceLosses(self.lpips, self.arcface, self.acc.unwrap_model(self.disc) if self.disc else None,
                                    w["face_mse"], w["face_lpips"], w["face_id"], w["face_adv"], w["face_crop_size"])
                f_losses, crops = face_l(sr, x_tgt, faces)
                losses.update(f_losses)
                total = sum(losses.values())
            self.acc.backward(total)
            if self.acc.sync_gradients and self.cfg["max_grad_norm"]:
                self.acc.clip_grad_norm_(self.gen_params, self.cfg["max_grad_norm"])
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            if self.reg is not None and w["vsd_lora"]:
                with self.acc.autocast():
                    loss_d = self.reg(x0.detach(), embeds) * w["vsd_lora"]
                self.acc.backward(loss_d)
                if self.acc.sync_gradients and self.cfg["max_grad_norm"]:  # OSEDiff clips the regulariser too
                    self.acc.clip_grad_norm_(self.acc.unwrap_model(self.reg).lora_parameters(),
                                             self.cfg["max_grad_norm"])
                self.opt_reg.step()
                self.sched_reg.step()
                self.opt_reg.zero_grad(set_to_none=True)
                logs["vsd_lora"] = loss_d.item()
            if self.disc is not None and w["face_adv"] and crops is not None:
                with self.acc.autocast():
                    d_loss = discriminator_loss(self.disc, *crops)
                self.acc.backward(d_loss)
                self.opt_disc.step()
                self.opt_disc.zero_grad(set_to_none=True)
                logs["disc"] = d_loss.item()
        vals = {**losses, "total": total}
        if self.acc.num_processes > 1:  # the global batch's mean, as one process would log it
            red = self.acc.reduce(torch.stack([v.detach().float() for v in vals.values()]), "mean")
            vals = dict(zip(vals, red))
        logs.update({k: v.item() for k, v in vals.items()})
        logs["faces"] = int(faces["boxes"].shape[0])
        if "index" in batch:  # the global batch's sample indices, in rank order (gathered from all processes)
            logs["samples"] = self.acc.gather(batch["index"].to(dev)).tolist()
        return logs

    def _loader(self, stage: dict, start: int, steps: int, split="train"):
        from .data import (
            PortraitCrops,
            StepBatches,
            collate,
            load_samples,
            load_shard_samples,
        )

        d = stage["data"]
        groups = None
        if d.get("shards"):
            samples, groups = load_shard_samples(d["shards"], split)
            if d.get("manifest") or d.get("folders"):
                raise HeadsUpError("data.shards cannot be mixed with data.manifest/data.folders in one stage.")
        else:
            samples = load_samples(d.get("manifest"), d.get("folders") or (), split)
        ds = PortraitCrops(samples, d["gt_size"], d["scale"], d["ref_dropout"], d["face_crop_prob"],
                           d["min_eye_distance"], d["flip_prob"], d["self_reference"])
        sampler = StepBatches(len(ds), d["batch_size"], self.cfg["seed"] + stage["index"], start,
                              self.acc.num_processes, self.acc.process_index, steps, groups)
        # its own generator: creating a loader must not draw from the global RNG (exact resume depends on it)
        return torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate,
                                           num_workers=d["num_workers"], generator=torch.Generator().manual_seed(0))

    def train(self, max_steps: int | None = None) -> list[dict]:
        """Run (or continue) the stages up to ``max_steps`` total steps; returns the per-step logs."""
        plan = stage_plan(self.cfg)
        end = sum(st["steps"] for st in plan) if max_steps is None else max_steps
        history = []
        logfile = (self.out / "logs.jsonl").open("a") if self.acc.is_main_process else None
        while self.step < end:
            stage = next(st for st in plan if st["start"] <= self.step < st["start"] + st["steps"])
            n = min(end, stage["start"] + stage["steps"]) - self.step
            for batch in self._loader(stage, self.step - stage["start"], n):
                logs = self.train_step(batch, stage)
                self.progress.step += 1
                logs.update(step=self.step, stage=stage["name"], lr=self.sched.get_last_lr()[0])
                history.append(logs)
                self._periodic(logs, logfile)
        if logfile:
            logfile.close()
        if history:
            self.save_checkpoint(self.out / "headsup_final.safetensors")
            self.save_state()
        self.acc.end_training()
        return history

    def _periodic(self, logs, logfile):
        c, s = self.cfg, self.step
        if logfile:
            logfile.write(json.dumps(logs) + "\n")
            logfile.flush()
        if c["log_every"] and s % c["log_every"] == 0:
            self.acc.log({k: v for k, v in logs.items() if isinstance(v, (int, float))}, step=s)
            log.info("step %d  %s", s, "  ".join(f"{k}={v:.4g}" for k, v in logs.items() if isinstance(v, float)))
        if c["val_every"] and s % c["val_every"] == 0:
            from .validate import validate

            self.acc.log({f"val/{k}": v for k, v in validate(self).items()}, step=s)
        if c["save_every"] and s % c["save_every"] == 0:
            self.save_checkpoint()
            self.save_state()
