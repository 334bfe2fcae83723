"""HeadsUpUpscale: runs the one-step pipeline inside ComfyUI's memory manager, with progress and interrupts."""
import logging

import torch
from comfy_api.latest import io
from headsup_core.color import COLOR_FIX_MODES
from headsup_core.errors import InterruptedByUser
from headsup_core.faces.condition import format_assignments
from headsup_core.options import MAX_SCALE, UpscaleOptions
from headsup_core.runner import Host, upscale_with_retry

from .loaders import FACE_ANALYSIS, HEADSUP_MODEL
from .reference import HEADSUP_REFERENCE

log = logging.getLogger("HeadsUp")

COLOR_FIXES = list(COLOR_FIX_MODES)


class ComfyHost(Host):
    """The core's OOM retry inside ComfyUI: its OOM exception counts, the weights are loaded reserving the
    plan's activation estimate before each attempt (the same plan then runs), and its cache is emptied after."""

    def __init__(self, handle):
        super().__init__()
        self.handle = handle

    def is_oom(self, exc: BaseException) -> bool:
        import comfy.model_management as mm

        return isinstance(exc, mm.OOM_EXCEPTION) or super().is_oom(exc)

    def before_try(self, plan) -> None:
        self.handle.load(memory_required(plan))

    def after_oom(self) -> None:
        import comfy.model_management as mm

        mm.soft_empty_cache(True)


def memory_required(plan) -> int:
    """Activation bytes of the plan that runs (ComfyUI adds the weights itself)."""
    return max(1, int(plan.estimate["activations"]))


def prompt_embeds_from(conditioning):
    """CONDITIONING -> its first text embedding (BxTxD); the core checks it against the model."""
    if conditioning is None:
        return None
    return conditioning[0][0]


def tag_source_from(tags, batch: int, conditioning=None):
    """A STRING of tags -> the pipeline's tag source: one line per image when the lines match the batch, else the
    whole string for every image. None when empty or when a conditioning (which wins) is connected."""
    if not tags or not str(tags).strip():
        return None
    if conditioning is not None:
        log.warning("HeadsUp: both tags and a conditioning are connected; the conditioning is used.")
        return None
    lines = str(tags).splitlines()
    per_image = lines if batch > 1 and len(lines) == batch else None
    whole = " ".join(line.strip() for line in lines if line.strip()).strip()
    seen = []

    def source(image):  # the pipeline asks once per image, in order (again from the first on an OOM retry)
        i = len(seen) % batch
        seen.append(i)
        return per_image[i].strip() if per_image else whole
    return source


class HeadsUpUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HeadsUpUpscale",
            display_name="HeadsUp Upscale",
            category="HeadsUp",
            description="One-step diffusion super-resolution of whole portraits, with optional identity "
                        "references for the faces.",
            inputs=[
                HEADSUP_MODEL.Input("model", tooltip="From HeadsUp Loader, or HeadsUp Patch Model (the graph's own "
                                                    "MODEL/VAE)."),
                io.Image.Input("image", tooltip="The low-quality image(s) to upscale."),
                io.Float.Input("scale", default=4.0, min=1.0, max=MAX_SCALE, step=0.5,
                               tooltip="Upscale factor. 4 is what the model is trained for."),
                io.Int.Input("tile_size", default=0, min=0, max=8192, step=64,
                             tooltip="Output tile size in pixels; 0 picks it automatically. Smaller tiles need "
                                     "less memory; on out-of-memory the tile is halved and the run retried."),
                io.Combo.Input("color_fix", options=COLOR_FIXES, default="adain",
                               tooltip="Keep the input's colours: adain matches per-channel mean/std, wavelet "
                                       "keeps the input's low frequencies, none leaves the model output."),
                HEADSUP_REFERENCE.Input("reference", optional=True,
                                        tooltip="Identity reference(s) from HeadsUp Reference Encoder. Weights "
                                                "whose reference channels were never trained (OSEDiff) ignore "
                                                "it: the node then says so in the log and on the node."),
                FACE_ANALYSIS.Input("face_analysis", optional=True,
                                    tooltip="Face analysis used to find the faces in the image. Without it, the "
                                            "reference's own face analysis is used; with neither, no face mask."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="Optional prompt (e.g. CLIPTextEncode with an SD2.x CLIP). Without "
                                              "it the prompt embedding stored in the weights is used."),
                # Added after the first inputs: new inputs go at the end, optional, so saved workflows keep working.
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="Fidelity <-> detail. 1 is the model's full restoration; lower values "
                                       "stay closer to the input (fewer invented details)."),
                io.Float.Input("match_threshold", default=0.3, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="Minimum identity similarity (cosine) for a reference to be placed on a "
                                       "face. Raise it if a reference lands on the wrong person."),
                io.String.Input("tags", optional=True, force_input=True,
                                tooltip="Tags for OSEDiff's prompt form \"TAGS, ,\" (HeadsUp Tagger, or any "
                                        "captioner); one line per image of a batch, or one for all. Needs the "
                                        "base's text encoder; a connected conditioning wins."),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The upscaled image(s)."),
                io.Mask.Output(display_name="face_mask", tooltip="The face mask the model was conditioned on."),
            ],
        )

    @classmethod
    def execute(cls, model, image, scale, tile_size, color_fix, reference=None, face_analysis=None,
                conditioning=None, strength=1.0, match_threshold=0.3, tags=None) -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.utils

        pipe = model.pipe
        references = list(reference.references) if reference is not None else None
        analyzer = face_analysis if face_analysis is not None else getattr(reference, "analyzer", None)
        bar = {}

        def progress(done, total):
            if bar.get("total") != total:
                bar["total"], bar["pbar"] = total, comfy.utils.ProgressBar(total)
            bar["pbar"].update_absolute(done, total)

        # 0 in the widget: tiles from the core's memory budget. The core's one OOM retry halves them.
        opts = UpscaleOptions(scale=scale, tile_size=tile_size or None, color_fix=color_fix, strength=strength,
                              match_threshold=match_threshold, prompt_embeds=prompt_embeds_from(conditioning),
                              tag_source=tag_source_from(tags, image.shape[0], conditioning))
        try:
            out, info = upscale_with_retry(pipe, image, options=opts, host=ComfyHost(model), reference=references,
                                           face_analyzer=analyzer, progress=progress,
                                           interrupt=mm.processing_interrupted, return_info=True)
        except InterruptedByUser:
            # The core's interrupt -> ComfyUI's own: the queue shows the prompt as interrupted, not failed.
            log.info("HeadsUp: interrupted by the user.")
            mm.throw_exception_if_processing_interrupted()
            raise mm.InterruptProcessingException() from None

        device = mm.intermediate_device()
        mask = info["face_mask"].to(device=device, dtype=torch.float32).squeeze(1)
        lines, used = [], pipe.conditioning_in_use()
        if references and not used["reference"]:
            lines.append(f"reference ignored: {info['reference_note']}")
            log.info("HeadsUp: %s", lines[-1])
        if analyzer is not None and not (used["mask"] or (references and used["reference"])):
            # the pipeline skipped face analysis: neither a mask nor a reference can reach these weights
            lines.append("face mask not computed: the weights' mask input channel of conv_in is zero")
            log.info("HeadsUp: %s", lines[-1])
        elif analyzer is not None:
            for i, faces in enumerate(info.get("assignments") or []):
                lines.append(f"image {i}:\n{format_assignments(faces)}")
                log.info("HeadsUp %s", lines[-1])
        # shown on the node (a text preview), so an ignored reference is visible where it was wired
        return io.NodeOutput(out.to(device), mask, ui={"text": lines} if lines else None)
