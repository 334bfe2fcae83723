"""HeadsUpBlendUpscale: the "general model + face model + paste" baseline as a node.

For users who only have OSEDiff weights today, and for side-by-side comparisons with HeadsUpUpscale. The work is
headsup_core.blend.blend_upscale (two ordinary HeadsUp pipelines); this file only wires ComfyUI's memory
manager, progress bar and interrupts around it.
"""
import torch
from comfy_api.latest import io
from headsup_core.blend import blend_upscale
from headsup_core.options import MAX_SCALE, UpscaleOptions

from .loaders import FACE_ANALYSIS, HEADSUP_MODEL
from .upscale import COLOR_FIXES, memory_required


class HeadsUpBlendUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HeadsUpBlendUpscale",
            display_name="HeadsUp Blend Upscale (general + face model)",
            category="HeadsUp",
            description="Baseline: a general model upscales the whole image, a face model upscales FFHQ-aligned "
                        "512x512 face crops, and the faces are pasted back with a feathered mask (as "
                        "FaceDetailer/CodeFormer do). HeadsUp Upscale does both in one model without seams.",
            inputs=[
                HEADSUP_MODEL.Input("general_model", tooltip="From HeadsUp Loader: the whole-image model "
                                                             "(e.g. OSEDiff weights)."),
                HEADSUP_MODEL.Input("face_model", tooltip="From HeadsUp Loader: the model run on the aligned "
                                                          "face crops (e.g. OSEDiff-face weights)."),
                FACE_ANALYSIS.Input("face_analysis", tooltip="From HeadsUp Face Analysis Loader: finds the faces "
                                                             "and their landmarks in the input."),
                io.Image.Input("image", tooltip="The low-quality image(s) to upscale."),
                io.Float.Input("scale", default=4.0, min=1.0, max=MAX_SCALE, step=0.5, tooltip="Upscale factor."),
                io.Int.Input("tile_size", default=0, min=0, max=8192, step=64,
                             tooltip="Output tile size in pixels for the general model; 0 picks it "
                                     "automatically."),
                io.Combo.Input("color_fix", options=COLOR_FIXES, default="adain",
                               tooltip="Colour fix of both models (see HeadsUp Upscale)."),
                io.Float.Input("feather", default=24.0, min=0.0, max=128.0, step=1.0,
                               tooltip="Softness of the paste edge in 512-crop pixels; 0 is a hard paste."),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The blended result."),
                io.Mask.Output(display_name="paste_mask", tooltip="Where face crops were pasted (feathered)."),
            ],
        )

    @classmethod
    def execute(cls, general_model, face_model, face_analysis, image, scale, tile_size, color_fix,
                feather) -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.utils

        patchers = [h.patcher for h in (general_model, face_model) if h.patcher is not None]
        if len(patchers) == 2 and patchers[0] is patchers[1]:
            patchers.pop()
        # The general model's plan for the whole image (the larger of the two runs: face crops are 512²), made
        # once: its estimate is reserved and it runs for every image of the batch (they share one size).
        plan = general_model.pipe.plan(image[:1], UpscaleOptions(scale=scale, tile_size=tile_size or None,
                                                                 color_fix=color_fix))
        if patchers:  # the ComfyUI-native backend (patcher None) loads the graph's models itself, per stage
            mm.load_models_gpu(patchers, memory_required=memory_required(plan), force_full_load=True)
        bar = comfy.utils.ProgressBar(image.shape[0])

        def progress(done, total):
            mm.throw_exception_if_processing_interrupted()

        outs, masks = [], []
        for i in range(image.shape[0]):  # one image at a time, so the bar moves per image
            out, info = blend_upscale(image[i:i + 1], general_model.pipe, face_model.pipe, scale,
                                      face_analysis, tile_size=tile_size or None, color_fix=color_fix,
                                      feather=feather, plan=plan, progress=progress, return_info=True)
            outs.append(out)
            masks.append(info["face_mask"])
            bar.update(1)
        device = mm.intermediate_device()
        mask = torch.cat(masks).to(device=device, dtype=torch.float32).squeeze(1)
        return io.NodeOutput(torch.cat(outs).to(device), mask)
