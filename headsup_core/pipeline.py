"""``HeadsUpPipeline``: the one orchestration shared by the CLI, the ComfyUI nodes, the A1111 script and eval.

Per image: bicubic upscale -> (faces: reference canvas + face mask) -> tiled VAE encode -> tiled one-step UNet
-> tiled VAE decode -> crop -> colour fix -> alpha re-attached. Images of a batch are processed one at a time,
so a batch gives exactly the result of its images run alone.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import devices
from .color import apply_color_fix
from .errors import HeadsUpError, InputImageError, InterruptedByUser
from .imageio import from_batch, tensor_to_uint8, to_batch
from .model import HeadsUpModel, assemble_unet_input, mask_to_latent
from .options import MAX_SCALE, OPTION_NAMES, UpscaleOptions, check_scale  # noqa: F401 - check_scale re-exported
from .tiling import TilePlan, run_tiled, tile_count

log = logging.getLogger("headsup")
MAX_OUTPUT_SIDE = 32768
# Longer side, in latent units, of the whole-image previews that give tiled VAE stages shared GroupNorm statistics.
ENCODER_PREVIEW = 64
DECODER_PREVIEW = 32
REFERENCE_UNUSED = ("the weights' reference input channels of conv_in are all zero (never trained, as in OSEDiff), "
                    "so a reference cannot change the output")


def output_size(h: int, w: int, scale: float) -> tuple[int, int]:
    oh, ow = max(1, round(h * scale)), max(1, round(w * scale))
    if max(oh, ow) > MAX_OUTPUT_SIDE:
        raise InputImageError(f"The output would be {ow}x{oh} pixels; sides above {MAX_OUTPUT_SIDE} are not supported.")
    return oh, ow


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (0, pw, 0, ph), mode="replicate")


class HeadsUpPipeline:
    def __init__(self, model: HeadsUpModel, text_encoder_loader: Callable | None = None, source: dict | None = None,
                 tag_source: Callable | None = None):
        from .loading.text_encoder import PromptEncoder

        self.model = model
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
                   tag_source: Callable | None = None, weight_dtype: str | None = "auto") -> "HeadsUpPipeline":
        """Load the SD2.x ``base`` (diffusers folder or single file) and HeadsUp/OSEDiff ``weights``.

        Conditioning (OSEDiff's): the embedding stored in the weights, else the base's text encoder applied to
        ``", ,"`` (OSEDiff's prompt form with no tags and no prompt). ``configs`` overrides the shipped SD2
        configs for single files (``{"unet", "vae", "text_encoder"}``). ``dtype`` is the compute dtype (default:
        per device and stage), ``weight_dtype`` the dtype the UNet's weights are kept in (``auto``: the compute
        dtype, or fp16 on a CPU whose memory budget is short; see loading/dtypes.py).
        """
        from .loading.build import build_model

        model, info = build_model(base, weights, device, dtype, prediction_type=prediction_type,
                                  sample_latent=sample_latent, configs=configs, weight_dtype=weight_dtype)
        from .perf import apply_cpu_defaults

        info["formats"] = apply_cpu_defaults(model, model.device, dtype)  # measured CPU formats (inference only)
        return cls(model, info.pop("text_encoder_loader"), info, tag_source=tag_source)

    def to(self, device=None, dtype=None) -> "HeadsUpPipeline":
        if dtype is not None:  # every stage now computes and stores in dtype: no narrower storage, no cast hooks
            from .loading.dtypes import retarget_storage

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
        from .loading.text_encoder import osediff_prompt

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
        used = getattr(self.model, "conditioning_in_use", None)
        if used is None:
            wide = self.model.in_channels > 4
            return {"reference": wide, "mask": wide}
        return dict(used)

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
        from .faces import as_references

        return as_references(reference, face_analyzer)

    # ----------------------------------------------------------------------------------------------- main
    def plan_tiles(self, tile_size: int | TilePlan | None, out_hw: tuple[int, int] | None = None,
                   options: UpscaleOptions | None = None) -> TilePlan:
        """``tile_size`` as given (a plan, or output pixels for every stage); ``None``: from the memory budget
        for an ``out_hw`` output (without ``out_hw``, the device's fixed default)."""
        if isinstance(tile_size, TilePlan):
            return tile_size
        if tile_size is None and out_hw is not None:
            from . import memory

            opts = options or UpscaleOptions()
            budget = memory.budget_bytes(self.device, opts.memory_fraction, opts.memory_budget_mb)
            return memory.plan_for_budget(self.model, self.latent_size(out_hw), budget, self.device,
                                          opts.vae_tiling or "exact")
        if tile_size is None:
            return TilePlan.for_device(self.device)
        if int(tile_size) < 64:
            raise InputImageError(f"tile_size {tile_size} is too small; use at least 64 output pixels.")
        return TilePlan.from_tile_size(int(tile_size), self.model.vae_scale)

    def latent_size(self, out_hw: tuple[int, int]) -> tuple[int, int]:
        """Latent size of an ``out_hw`` output once padded to the UNet's pixel multiple."""
        from .memory import latent_size

        return latent_size(out_hw, self._pixel_multiple(), self.model.vae_scale)

    def _pixel_multiple(self) -> int:
        # UNet downsamplings need it; a model without a diffusers UNet config (the ComfyUI backend) names it.
        model = self.model
        return getattr(model, "pixel_multiple", None) or model.vae_scale * 2 ** (len(model.unet.config.block_out_channels) - 1)

    def plan_for(self, image, options: UpscaleOptions | None = None) -> TilePlan:
        """The tile plan ``upscale(image, options=options)`` runs with (what the OOM retry halves)."""
        opts = options or UpscaleOptions()
        h, w = image if isinstance(image, tuple) else to_batch(image).size
        out_hw = output_size(h, w, opts.scale)
        plan = self.plan_tiles(opts.tile_size, out_hw, opts)
        if opts.vae_tiling is not None:  # "exact" (default: whole-image GroupNorm statistics) or "fast" (preview)
            plan = dataclasses.replace(plan, vae_mode=opts.vae_tiling)
        return plan

    @torch.no_grad()
    def upscale(self, image, scale: float = 4.0, reference=None, prompt: str | None = None,
                tile_size: int | TilePlan | None = None, color_fix: str = "adain", seed: int = 0, *,
                options: UpscaleOptions | None = None, face_analyzer=None,
                progress: Callable[[int, int], Any] | None = None, interrupt: Callable[[], bool] | None = None,
                return_info: bool = False, **option_fields):
        """Upscale ``image`` (PIL, HxWxC uint8 numpy, or BxHxWxC float tensor); the result is the same kind.

        The request is ``options`` (an ``UpscaleOptions``) with the keywords applied on top (a keyword left at
        its default does not override); every ``UpscaleOptions`` field is accepted as a keyword (``strength``,
        ``prompt_embeds``, ``match_threshold``, ``vae_tiling``, ``memory_fraction``, ...). ``progress(done,
        total)`` is called after every tile; ``interrupt()`` is polled there too and, when it returns True, the
        run stops with ``InterruptedByUser`` (every front end maps that to its host's convention).
        """
        unknown = sorted(set(option_fields) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(f"upscale() got unexpected keyword argument(s): {', '.join(unknown)}")
        opts = UpscaleOptions.merge(options, scale=scale, prompt=prompt, tile_size=tile_size, color_fix=color_fix,
                                    seed=seed, **option_fields)
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
        h, w = batch.size
        oh, ow = output_size(h, w, opts.scale)
        plan = self.plan_for((h, w), opts)
        log.debug("HeadsUp tiles for %dx%d: %s", ow, oh, plan.describe())
        total = batch.rgb.shape[0] * self._tiles_per_image(oh, ow, plan, refs is not None)
        done = [0]

        def tick():
            done[0] += 1
            if progress is not None:
                progress(done[0], total)
            if interrupt is not None and interrupt():
                raise InterruptedByUser("Interrupted by the user.")

        outputs, masks, assignments, timings, used_tags = [], [], [], [], []
        for i in range(batch.rgb.shape[0]):
            if embeds is None:  # per-image tags from the tag source
                tags = tag_source(batch.rgb[i:i + 1])
                log.info("HeadsUp image %d tags: %s", i, tags or "(none)")
                used_tags.append(tags)
                emb = self._prompt_embeds(prompt, None, tags=tags)
            else:
                emb = embeds[i:i + 1] if embeds.shape[0] == batch.rgb.shape[0] else embeds[:1]
            out, mask, assigned, timing = self._upscale_one(batch.rgb[i:i + 1], (oh, ow), refs, emb, plan, opts,
                                                            face_analyzer, tick)
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
                        "output_size": (oh, ow), "tile_plan": plan, "reference_used": bool(refs) and placed,
                        "reference_note": None if bool(refs) and placed else reference_note,
                        "face_mask_used": used["mask"] and face_analyzer is not None,
                        "tags": used_tags if embeds is None else None}

    def _tiles_per_image(self, oh: int, ow: int, plan: TilePlan, with_reference: bool) -> int:
        lh, lw = self.latent_size((oh, ow))
        enc = plan.vae_tile_count(lh, lw, "encoder")
        return (enc * (2 if with_reference else 1) + tile_count(lh, lw, plan.unet_tile, plan.unet_overlap)
                + plan.vae_tile_count(lh, lw, "decoder"))

    # ----------------------------------------------------------------------------------------------- VAE stages
    def _exact_vae(self, plan: TilePlan, stage: str, latent_hw: tuple[int, int]) -> bool:
        """Lockstep exact tiles; a stage that fits one tile runs the plain forward instead (exactly untiled)."""
        from .tiled_vae import supports_exact

        return (plan.vae_mode == "exact" and plan.vae_tile_count(*latent_hw, stage) > 1
                and supports_exact(getattr(self.model, "vae", None)))

    def _vae_encode(self, x, plan: TilePlan, tick, generator, stage: str, to_unit: bool, options=None):
        """Tiled VAE encode of an image in [0, 1] (``to_unit``) or [-1, 1] -> scaled latent."""
        model, dev, s = self.model, self.device, self.model.vae_scale
        if not bool(x.abs().amax() > 0) and not to_unit:  # an empty reference canvas encodes to nothing
            for _ in range(plan.vae_tile_count(x.shape[-2] // s, x.shape[-1] // s, "encoder")):
                tick()
            return torch.zeros(1, 4, x.shape[-2] // s, x.shape[-1] // s, device=dev)
        if self._exact_vae(plan, "encoder", (x.shape[-2] // s, x.shape[-1] // s)):
            from .tiled_vae import encoder_forward, run_exact

            def fwd(vae, t, park):
                t = t.to(model.encoder_dtype)
                return encoder_forward(vae, t * 2 - 1 if to_unit else t, park)

            ram = self._vae_ram_budget(plan, "encoder", (x.shape[-2] // s, x.shape[-1] // s), options)

            def run():
                return run_exact(fwd, model.vae, x, tile=plan.encoder_tile, context=plan.encoder_context,
                                 in_factor=s, out_factor=1, compute_device=dev, out_device=dev, progress=tick,
                                 ram_budget=ram)
            moments = self._guard_stage(run, self._stage_module("encoder"), stage)
            return model.latent_from_moments(moments, generator)
        enc = self._guard(lambda t: model.encode(t * 2 - 1 if to_unit else t, generator),
                          self._stage_module("encoder"), stage)
        return run_tiled(enc, x, tile=plan.encoder_tile, overlap=plan.encoder_overlap, in_factor=s, out_factor=1,
                         out_channels=4, compute_device=dev, out_device=dev, progress=tick,
                         skip=None if to_unit else (lambda t: not bool(t.abs().amax() > 0)),
                         norm_sync=model.vae.encoder, preview_side=ENCODER_PREVIEW, context=plan.encoder_overlap)

    def _vae_decode(self, x0, plan: TilePlan, tick, options=None):
        """Tiled VAE decode of a scaled latent -> image in [-1, 1] on the CPU."""
        model, dev, s = self.model, self.device, self.model.vae_scale
        if self._exact_vae(plan, "decoder", tuple(x0.shape[-2:])):
            from .tiled_vae import decoder_forward, run_exact

            def fwd(vae, t, park):
                return decoder_forward(vae, t.to(model.decoder_dtype) / model.scaling_factor, park)

            ram = self._vae_ram_budget(plan, "decoder", tuple(x0.shape[-2:]), options)

            def run():
                return run_exact(fwd, model.vae, x0, tile=plan.decoder_tile, context=plan.decoder_context,
                                 in_factor=1, out_factor=s, compute_device=dev, out_device=torch.device("cpu"),
                                 progress=tick, ram_budget=ram)
            return self._guard_stage(run, self._stage_module("decoder"), "decoder").clamp_(-1, 1)
        dec = self._guard(model.decode, self._stage_module("decoder"), "decoder")
        return run_tiled(dec, x0, tile=plan.decoder_tile, overlap=plan.decoder_overlap, in_factor=1, out_factor=s,
                         out_channels=3, compute_device=dev, out_device=torch.device("cpu"), progress=tick,
                         norm_sync=model.vae.decoder, preview_side=DECODER_PREVIEW, context=plan.decoder_overlap // 2)

    def _vae_ram_budget(self, plan: TilePlan, stage: str, latent_hw, options) -> int:
        """RAM the exact tiled VAE may park activations in; beyond it they spill to disk (memory.vae_ram_budget)."""
        from .memory import vae_ram_budget

        opts = options or UpscaleOptions()
        return vae_ram_budget(self.model, plan, latent_hw, stage, self.device, opts.memory_fraction,
                              opts.memory_budget_mb)

    def _stage_module(self, stage: str) -> torch.nn.Module:
        """The modules of a VAE stage (their dtype may differ per stage, see perf.py), for the fp32 retry."""
        from .perf import stage_modules

        if not hasattr(getattr(self.model, "vae", None), "decoder"):
            return self.model.vae
        return torch.nn.ModuleList(stage_modules(self.model, stage))

    def _guard_stage(self, run, module, stage: str):
        """A whole exact-tiled stage; on NaN/Inf in half precision, rerun it in fp32 and say so."""
        out = run()
        if next(module.parameters()).dtype != torch.float32 and not torch.isfinite(out).all():
            log.warning("HeadsUp: NaN/Inf in the %s stage in %s; retrying it in fp32.", stage,
                        next(module.parameters()).dtype)
            with devices.upcast(module):
                out = run()
        return out

    def _guard(self, fn, module, stage: str):
        """Run a stage tile; on NaN/Inf in half precision, retry that tile in fp32 and say so."""
        if not getattr(self.model, "retry_in_fp32", True):  # a host-managed model (ComfyUI) owns its precision
            return fn

        def run(t):
            out = fn(t)
            if out.dtype != torch.float32 or next(module.parameters()).dtype != torch.float32:
                if not torch.isfinite(out).all():
                    log.warning("HeadsUp: NaN/Inf in the %s stage in %s; retrying this tile in fp32.", stage,
                                next(module.parameters()).dtype)
                    with devices.upcast(module):
                        out = fn(t)
            return out
        return run

    @staticmethod
    def _mark_peak(timing: dict, stage: str, device: torch.device) -> None:
        """Peak memory of the stage just finished (GPU: allocated, reset per stage; CPU: process peak RSS)."""
        timing[f"{stage}_peak_mb"] = devices.peak_memory_bytes(device) / 2**20
        devices.reset_peak_memory(device)

    def _upscale_one(self, lq, out_hw, refs, embeds, plan: TilePlan, opts: UpscaleOptions, face_analyzer, tick):
        from .memory import stage_overhead

        model, dev = self.model, self.device
        s = model.vae_scale
        oh, ow = out_hw
        seed, strength = opts.seed, opts.strength
        timing: dict[str, float] = {}
        devices.reset_peak_memory(dev)
        t0 = time.perf_counter()
        up = F.interpolate(lq, size=(oh, ow), mode="bicubic", align_corners=False).clamp_(0, 1)
        multiple = self._pixel_multiple()
        padded = _pad_to_multiple(up, multiple)
        lh, lw = padded.shape[-2] // s, padded.shape[-1] // s
        for stage, key in (("encoder", "encode"), ("unet", "unet"), ("decoder", "decode")):
            # Tile overhead: extra latent pixels computed for overlaps and context, over the image's (0 = untiled).
            timing[f"{key}_tiles"], timing[f"{key}_overhead"] = stage_overhead(plan, (lh, lw), stage)
        generator = torch.Generator(device=dev).manual_seed(int(seed)) if model.sample_latent else None

        face_mask_px = torch.zeros(1, 1, oh, ow)
        ref_latent = mask_lat = None
        assigned: list = []
        if face_analyzer is not None and model.in_channels > 4:
            from .faces import build_face_condition

            cond = build_face_condition(tensor_to_uint8(lq)[0], (oh, ow), face_analyzer, refs,
                                        match_threshold=opts.match_threshold,
                                        mask_without_reference=opts.mask_without_reference)
            face_mask_px, assigned = cond.mask.float().cpu(), list(cond.assignments)
            # Training always conditions on a face mask, so inference draws it whenever faces are analysed.
            log.info("HeadsUp: face mask drawn on %d face(s) (%s face backend)%s", len(assigned),
                     getattr(face_analyzer, "backend", "?"), "" if refs else ", no reference")
            mask_lat = mask_to_latent(_pad_to_multiple(face_mask_px, multiple), (lh, lw)).to(dev)
            if refs:
                # each reference is encoded in its own face window, as in training (faces.condition)
                from .faces.condition import encode_reference_windows

                windows = [a["ref_window"] for a in cond.assignments if "ref_window" in a]
                ref_latent = encode_reference_windows(cond.canvas.float(), windows, lambda t: self._vae_encode(
                    t, plan, lambda: None, generator, "reference encoder", to_unit=False, options=opts), (lh, lw))
                for _ in range(plan.vae_tile_count(lh, lw, "encoder")):  # the progress total counts these
                    tick()
                ref_latent = None if ref_latent is None else ref_latent.to(dev) * mask_lat
        elif refs:
            raise InputImageError("A reference was given but no face analyzer; pass face_analyzer (e.g. --faces insightface).")
        timing["faces_s"] = time.perf_counter() - t0
        self._mark_peak(timing, "faces", dev)

        t1 = time.perf_counter()
        # Map to [-1, 1] per tile, so no second full-size copy of the image is made.
        lq_latent = self._vae_encode(padded, plan, tick, generator, "encoder", to_unit=True, options=opts)
        timing["encode_s"] = time.perf_counter() - t1
        self._mark_peak(timing, "encode", dev)

        t2 = time.perf_counter()
        unet_in = assemble_unet_input(lq_latent, ref_latent, mask_lat, model.in_channels)
        step = self._guard(lambda t: model.predict_x0(t, t[:, :4], embeds, strength), model.unet, "UNet")
        x0 = run_tiled(step, unet_in, tile=plan.unet_tile, overlap=plan.unet_overlap, in_factor=1, out_factor=1,
                       out_channels=4, compute_device=dev, out_device=dev, progress=tick)
        timing["unet_s"] = time.perf_counter() - t2
        self._mark_peak(timing, "unet", dev)

        t3 = time.perf_counter()
        y = self._vae_decode(x0, plan, tick, opts)
        timing["decode_s"] = time.perf_counter() - t3
        self._mark_peak(timing, "decode", dev)
        log.debug("HeadsUp %dx%d: %s", ow, oh, ", ".join(f"{k}={v:.2f}" for k, v in timing.items()))
        out = ((y[..., :oh, :ow] + 1) / 2).clamp_(0, 1)
        out = apply_color_fix(out, up.cpu(), opts.color_fix)
        return out, face_mask_px, assigned, timing
