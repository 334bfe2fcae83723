"""``HeadsUpPipeline``: the one orchestration shared by the CLI, the ComfyUI nodes, the A1111 script and eval.

Per image: bicubic upscale -> (faces: reference canvas + face mask) -> tiled VAE encode -> tiled one-step UNet
-> tiled VAE decode -> crop -> colour fix -> alpha re-attached. Images of a batch are processed one at a time,
so a batch gives exactly the result of its images run alone.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import devices, memory, stages
from .color import apply_color_fix
from .errors import HeadsUpError, InputImageError, InterruptedByUser
from .faces import as_references, build_face_condition
from .faces.condition import encode_reference_windows
from .geometry import pad_to_multiple
from .imageio import from_batch, tensor_to_uint8, to_batch
from .loading.build import build_model
from .loading.dtypes import retarget_storage
from .loading.text_encoder import PromptEncoder, osediff_prompt
from .memory import stage_overhead
from .model import assemble_unet_input, mask_to_latent
from .options import OPTION_NAMES, UNSET, UpscaleOptions
from .perf import apply_cpu_defaults
from .planner import Plan, plan_request
from .tiling import TilePlan

log = logging.getLogger("headsup")
REFERENCE_UNUSED = ("the weights' reference input channels of conv_in are all zero (never trained, as in OSEDiff), "
                    "so a reference cannot change the output")


class HeadsUpPipeline:
    def __init__(self, model, text_encoder_loader: Callable | None = None, source: dict | None = None,
                 tag_source: Callable | None = None):
        self.model = model  # a Backend (backend.py): HeadsUpModel, or ComfyUI's ComfyHeadsUpModel
        self._text_encoder_loader = text_encoder_loader
        self.source = dict(source or {})
        key = self.source.get("base_key") or self.source.get("base") or f"pipeline-{id(self)}"
        self.prompt_encoder = PromptEncoder(text_encoder_loader, key) if text_encoder_loader is not None else None
        # Optional tag source (the paper's "language description extraction"): LQ image (1x3xHxW, 0..1) -> tags,
        # put into OSEDiff's prompt form f"{tags}, {prompt},". None ships; see docs/README "Prompt and tags".
        self.tag_source = tag_source
        self._said_reference_unused = False

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_files(cls, base, weights=None, device=None, dtype=None, prediction_type: str | None = None,
                   sample_latent: bool = False, configs: dict | None = None,
                   tag_source: Callable | None = None, weight_dtype: str | None = "auto",
                   compute_device=None) -> "HeadsUpPipeline":
        """Load the SD2.x ``base`` (diffusers folder or single file) and HeadsUp/OSEDiff ``weights``.

        Conditioning (OSEDiff's): the embedding stored in the weights, else the base's text encoder applied to
        ``", ,"`` (OSEDiff's prompt form with no tags and no prompt). ``configs`` overrides the shipped SD2
        configs for single files (``{"unet", "vae", "text_encoder"}``). ``dtype`` is the compute dtype (default:
        per device and stage), ``weight_dtype`` the dtype the UNet's weights are kept in (``auto``: the compute
        dtype, or fp16 on a CPU whose memory budget is short; see loading/dtypes.py). ``compute_device``: the
        device the model will run on when it is built on another (a host's offload device): precision and formats
        are chosen for it (default: ``device``).
        """
        model, info = build_model(base, weights, device, dtype, prediction_type=prediction_type,
                                  sample_latent=sample_latent, configs=configs, weight_dtype=weight_dtype,
                                  compute_device=compute_device)
        run = model.device if compute_device is None else torch.device(compute_device)
        info["formats"] = apply_cpu_defaults(model, run, dtype)  # measured CPU formats (inference only)
        return cls(model, info.pop("text_encoder_loader"), info, tag_source=tag_source)

    def to(self, device=None, dtype=None) -> "HeadsUpPipeline":
        if dtype is not None:  # every stage now computes and stores in dtype: no narrower storage, no cast hooks
            retarget_storage(self.model, dtype)
        self.model.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # ----------------------------------------------------------------------------------------------- prompt
    @torch.no_grad()
    def encode_prompt(self, text: str) -> torch.Tensor:
        """Encode ``text`` as it is with the base's text encoder (loaded for this and freed after; cached)."""
        if self.prompt_encoder is None:
            raise HeadsUpError(
                "A text prompt needs the base model's text encoder, and this base has none. Use an SD2.x base "
                "file that contains its text encoder (e.g. v2-1_512-ema-pruned.safetensors) or a diffusers folder "
                "with text_encoder/, or pass prompt_embeds / a ComfyUI CONDITIONING instead."
            )
        return self.prompt_encoder.encode(text)

    def _prompt_embeds(self, prompt, prompt_embeds, tags: str | None = None) -> torch.Tensor:
        if prompt_embeds is not None:
            embeds = torch.as_tensor(prompt_embeds).float()
            if embeds.ndim == 2:
                embeds = embeds[None]
            if embeds.ndim != 3 or embeds.shape[-1] != self.model.cross_attention_dim:
                raise InputImageError(
                    f"The prompt embedding has shape {tuple(embeds.shape)} but this model needs Bx77x"
                    f"{self.model.cross_attention_dim} (use the SD2.x text encoder that matches the base)."
                )
            return embeds
        if prompt or tags:
            # OSEDiff's form: a user prompt P is encoded as ", P," (with tags T: "T, P,").
            return self.encode_prompt(osediff_prompt(prompt, tags))
        return self.model.default_prompt_embeds

    # ----------------------------------------------------------------------------------------------- faces
    def conditioning_in_use(self) -> dict[str, bool]:
        """{"reference": bool, "mask": bool}: whether the weights can react to a reference / the face mask
        (their conv_in input weights are not all zero). Front ends skip the work an unused input would cost."""
        return dict(self.model.conditioning_in_use)

    def reference_unused_reason(self) -> str | None:
        """Why a reference would be ignored by these weights (None: it can be used)."""
        return None if self.conditioning_in_use()["reference"] else REFERENCE_UNUSED

    def note_reference_unused(self) -> str:
        """Say once per pipeline that a given reference is ignored (every front end ends up here)."""
        reason = self.reference_unused_reason() or ""
        if not self._said_reference_unused:
            self._said_reference_unused = True
            log.warning("HeadsUp: the reference is ignored: %s. No face matching or reference encoding is done.",
                        reason)
        return reason

    def _references(self, reference, face_analyzer):
        """The faces package's one reference normaliser: each photo is one person."""
        if reference is None:
            return None
        return as_references(reference, face_analyzer)

    # ----------------------------------------------------------------------------------------------- main
    def plan(self, image, options: UpscaleOptions | None = None, budget: int | None = None) -> Plan:
        """The plan ``upscale(image, options=options)`` runs with: tiles, memory budget (read once here, unless
        ``budget`` bytes are given) and estimate. ``image`` may be an (h, w) size."""
        h, w = image if isinstance(image, tuple) else to_batch(image).size
        return plan_request(self.model, (h, w), options or UpscaleOptions(), self.device, budget)

    @torch.no_grad()
    def upscale(self, image, scale: float = UNSET, reference=None, prompt: str | None = UNSET,
                tile_size: int | TilePlan | None = UNSET, color_fix: str = UNSET, seed: int = UNSET, *,
                options: UpscaleOptions | None = None, plan: Plan | None = None, face_analyzer=None,
                progress: Callable[[int, int], Any] | None = None, interrupt: Callable[[], bool] | None = None,
                return_info: bool = False, **option_fields):
        """Upscale ``image`` (PIL, HxWxC uint8 numpy, or BxHxWxC float tensor); the result is the same kind.

        The request is ``options`` (an ``UpscaleOptions``; default: its defaults, e.g. scale 4, colour fix adain,
        seed 0) with every keyword passed applied on top; every ``UpscaleOptions`` field is accepted as a keyword
        (``strength``, ``prompt_embeds``, ``match_threshold``, ``vae_tiling``, ``memory_fraction``, ...). ``plan``
        (from ``plan(image, options)``, e.g. a halved one) runs as it is, with its options; without it one is made. ``progress(done,
        total)`` is called after every tile, and on a CPU also inside it as each resnet, sampler or attention
        block ends (the total is the plan's ``ticks_per_image``); ``interrupt()`` is polled there too and, when
        it returns True, the run stops with ``InterruptedByUser`` (every front end maps that to its host's
        convention).
        """
        unknown = sorted(set(option_fields) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(f"upscale() got unexpected keyword argument(s): {', '.join(unknown)}")
        opts = UpscaleOptions.override(options, scale=scale, prompt=prompt, tile_size=tile_size,
                                       color_fix=color_fix, seed=seed, **option_fields)
        if plan is not None and opts is not plan.options:
            raise TypeError("upscale() runs a plan with the plan's own options: pass plan=... alone (or with "
                            "options=plan.options), not other options.")
        if interrupt is not None and interrupt():
            raise InterruptedByUser("Interrupted by the user before the upscale started.")
        batch = to_batch(image)
        used = self.conditioning_in_use()
        reference_note = "no reference given" if reference is None else None
        if reference is not None and not used["reference"]:
            reference, reference_note = None, self.note_reference_unused()
        if face_analyzer is not None and not (used["mask"] or (reference is not None and used["reference"])):
            face_analyzer = None  # neither a face mask nor a reference can reach the UNet: skip face analysis
        refs = self._references(reference, face_analyzer)
        tag_source = opts.tag_source or self.tag_source
        prompt, prompt_embeds = opts.prompt, opts.prompt_embeds
        embeds = None if tag_source is not None and prompt_embeds is None else self._prompt_embeds(prompt, prompt_embeds)
        if plan is None:
            plan = self.plan(batch.size, opts)
        memory.hold_to_budget(plan.device, opts.memory_budget_mb)
        oh, ow = plan.out_hw
        log.debug("HeadsUp tiles for %dx%d: %s", ow, oh, plan.describe())
        ticks = stages.Progress(batch.rgb.shape[0] * plan.ticks_per_image(), progress, interrupt)

        outputs, masks, assignments, timings, used_tags = [], [], [], [], []
        for i in range(batch.rgb.shape[0]):
            if embeds is None:  # per-image tags from the tag source
                tags = tag_source(batch.rgb[i:i + 1])
                log.info("HeadsUp image %d tags: %s", i, tags or "(none)")
                used_tags.append(tags)
                emb = self._prompt_embeds(prompt, None, tags=tags)
            else:
                emb = embeds[i:i + 1] if embeds.shape[0] == batch.rgb.shape[0] else embeds[:1]
            out, mask, assigned, timing = self._upscale_one(batch.rgb[i:i + 1], refs, emb, plan, face_analyzer,
                                                            ticks)
            outputs.append(out)
            masks.append(mask)
            assignments.append(assigned)
            timings.append(timing)
        rgb = torch.cat(outputs)
        alpha = None
        if batch.alpha is not None:
            alpha = F.interpolate(batch.alpha, size=(oh, ow), mode="bicubic", align_corners=False).clamp(0, 1)
        result = from_batch(rgb, alpha, batch)
        if not return_info:
            return result
        placed = any(a.get("reference_index") is not None for faces in assignments for a in faces)
        if refs and not placed:
            reference_note = "no face matched a reference"
        return result, {"face_mask": torch.cat(masks), "assignments": assignments, "timings": timings,
                        "output_size": (oh, ow), "tile_plan": plan.tiles, "reference_used": bool(refs) and placed,
                        "reference_note": None if bool(refs) and placed else reference_note,
                        "face_mask_used": used["mask"] and face_analyzer is not None,
                        "tags": used_tags if embeds is None else None}

    @staticmethod
    def _mark_peak(timing: dict, stage: str, device: torch.device) -> None:
        """Peak memory of the stage just finished (GPU: allocated, reset per stage; CPU: process peak RSS)."""
        timing[f"{stage}_peak_mb"] = devices.peak_memory_bytes(device) / 2**20
        devices.reset_peak_memory(device)

    def _upscale_one(self, lq, refs, embeds, plan: Plan, face_analyzer, ticks: stages.Progress):
        model, dev, opts = self.model, self.device, plan.options
        oh, ow = plan.out_hw
        timing: dict[str, float] = {}
        devices.reset_peak_memory(dev)
        t0 = time.perf_counter()
        up = F.interpolate(lq, size=(oh, ow), mode="bicubic", align_corners=False).clamp_(0, 1)
        padded = pad_to_multiple(up, model.pixel_multiple)
        lh, lw = plan.latent_hw
        for stage, key in (("encoder", "encode"), ("unet", "unet"), ("decoder", "decode")):
            # Tile overhead: extra latent pixels computed for overlaps and context, over the image's (0 = untiled).
            timing[f"{key}_tiles"], timing[f"{key}_overhead"] = stage_overhead(plan.tiles, (lh, lw), stage)
        generator = torch.Generator(device=dev).manual_seed(int(opts.seed)) if model.sample_latent else None

        face_mask_px = torch.zeros(1, 1, oh, ow)
        ref_latent = mask_lat = None
        assigned: list = []
        if face_analyzer is not None and model.in_channels > 4:
            cond = build_face_condition(tensor_to_uint8(lq)[0], (oh, ow), face_analyzer, refs,
                                        match_threshold=opts.match_threshold,
                                        mask_without_reference=opts.mask_without_reference)
            face_mask_px, assigned = cond.mask.float().cpu(), list(cond.assignments)
            # Training always conditions on a face mask, so inference draws it whenever faces are analysed.
            log.info("HeadsUp: face mask drawn on %d face(s) (%s face backend)%s", len(assigned),
                     getattr(face_analyzer, "backend", "?"), "" if refs else ", no reference")
            mask_lat = mask_to_latent(pad_to_multiple(face_mask_px, model.pixel_multiple), (lh, lw)).to(dev)
            if refs:
                ref_latent = self._encode_references(cond, plan, generator, ticks, (lh, lw))
                ref_latent = None if ref_latent is None else ref_latent.to(dev) * mask_lat
        elif refs:
            raise InputImageError("A reference was given but no face analyzer; pass face_analyzer (e.g. --faces insightface).")
        timing["faces_s"] = time.perf_counter() - t0
        self._mark_peak(timing, "faces", dev)

        t1 = time.perf_counter()
        lq_latent = stages.encode(model, padded, plan, ticks.tick, generator, to_unit=True)
        timing["encode_s"] = time.perf_counter() - t1
        self._mark_peak(timing, "encode", dev)

        t2 = time.perf_counter()
        unet_in = assemble_unet_input(lq_latent, ref_latent, mask_lat, model.in_channels)
        x0 = stages.predict(model, unet_in, embeds, opts.strength, plan, ticks.tick)
        timing["unet_s"] = time.perf_counter() - t2
        self._mark_peak(timing, "unet", dev)

        t3 = time.perf_counter()
        y = stages.decode(model, x0, plan, ticks.tick)
        timing["decode_s"] = time.perf_counter() - t3
        self._mark_peak(timing, "decode", dev)
        log.debug("HeadsUp %dx%d: %s", ow, oh, ", ".join(f"{k}={v:.2f}" for k, v in timing.items()))
        out = ((y[..., :oh, :ow] + 1) / 2).clamp_(0, 1)
        out = apply_color_fix(out, up.cpu(), opts.color_fix)
        return out, face_mask_px, assigned, timing

    def _encode_references(self, cond, plan: Plan, generator, ticks: stages.Progress, latent_hw):
        """Each reference encoded in its own face window, as in training (faces.condition); the windows' tiles
        join the progress total once they are known."""
        windows = [a["ref_window"] for a in cond.assignments if "ref_window" in a]
        s = self.model.vae_scale
        ticks.extend(sum(plan.stage_ticks("encoder", ((y1 - y0) // s, (x1 - x0) // s))
                         for x0, y0, x1, y1 in windows))

        def encode(window):
            return stages.encode(self.model, window, plan, ticks.tick, generator)
        return encode_reference_windows(cond.canvas.float(), windows, encode, latent_hw)
