"""HeadsUpLoader and HeadsUpFaceAnalysisLoader.

ComfyUI clones node classes for every run, so the caches live at module level. Loading happens in
headsup_core; this file only maps widgets to paths/devices and wraps the model for ComfyUI's memory
manager.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass

from typing import TYPE_CHECKING, Optional

import torch
from comfy_api.latest import io
from headsup_core.precision import DTYPE_CHOICES, host_dtype

if TYPE_CHECKING:  # typing only: importing these at load time would pull diffusers in for every ComfyUI start
    from comfy.model_patcher import ModelPatcher
    from headsup_core.pipeline import HeadsUpPipeline

from . import paths

log = logging.getLogger("HeadsUp")

HEADSUP_MODEL = io.Custom("HEADSUP_MODEL")
FACE_ANALYSIS = io.Custom("HEADSUP_FACE_ANALYSIS")

# "auto" first: a new node picks a working backend; saved workflows keep the value they stored.
FACE_BACKENDS = ["auto", "insightface", "facexlib", "dlib"]
PROVIDERS = ["auto", "CPU", "CUDA", "ROCm", "DirectML", "CoreML"]
_ORT_PROVIDERS = {"CPU": "CPUExecutionProvider", "CUDA": "CUDAExecutionProvider", "ROCm": "ROCMExecutionProvider",
                  "DirectML": "DmlExecutionProvider", "CoreML": "CoreMLExecutionProvider"}

_MODEL_CACHE = OrderedDict()  # key -> HeadsUpHandle; two entries so A/B workflows don't reload each run
_ANALYZER_CACHE = OrderedDict()
_CACHE_SIZE = 2


@dataclass
class HeadsUpHandle:
    """What travels on a HEADSUP_MODEL wire: the pipeline and the ModelPatcher that owns its weights.

    ``patcher`` is None for the ComfyUI-native backend (HeadsUpPatchModel): its model loads the graph's own
    patched MODEL/VAE through ComfyUI at each stage, so the nodes must not load anything for it."""
    pipe: HeadsUpPipeline
    patcher: Optional[ModelPatcher]
    name: str

    def load(self, memory_required: int) -> None:
        """Put the weights on the compute device before a run (the diffusers backend only)."""
        if self.patcher is not None:
            import comfy.model_management as mm

            mm.load_models_gpu([self.patcher], memory_required=memory_required, force_full_load=True)


class PatchTarget(torch.nn.Module):
    """The module handed to ComfyUI's ModelPatcher. ModelPatcher writes `model.device` and bookkeeping
    attributes onto its module; HeadsUpModel derives `device` from its parameters (read-only), so it is
    wrapped. Moving this wrapper moves the HeadsUp model, and the pipeline follows its parameters."""

    def __init__(self, headsup_model):
        super().__init__()
        self.headsup = headsup_model


def make_patcher(pipe, load_device, offload_device):
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(PatchTarget(pipe.model), load_device=load_device,
                                            offload_device=offload_device)


def _remember(cache, key, value):
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)


def _stamp(path):
    # Re-load when a file is replaced in place (a new training checkpoint with the same name).
    return (os.path.abspath(path), os.path.getmtime(path))


def comfy_dtype(choice, device):
    """The widget's dtype; ``auto`` asks precision.py with what ComfyUI says the device supports."""
    import comfy.model_management as mm

    if choice != "auto" or device.type == "cpu":
        return host_dtype(choice, device)
    return host_dtype(choice, device, bf16_ok=mm.should_use_bf16(device), fp16_ok=mm.should_use_fp16(device))


class HeadsUpLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HeadsUpLoader",
            display_name="HeadsUp Loader",
            category="HeadsUp",
            description="Loads a HeadsUp (or OSEDiff) one-step super-resolution model on top of an SD2.x base.",
            inputs=[
                io.Combo.Input("weights", options=paths.list_weights(),
                               tooltip="HeadsUp .safetensors or OSEDiff .pkl weights from models/headsup."),
                io.Combo.Input("base", options=paths.list_bases(),
                               tooltip="The SD2.x base the weights were trained on (SD 2.1-base or SD-Turbo): a "
                                       "single file from models/checkpoints or a folder from models/diffusers."),
                io.Combo.Input("dtype", options=list(DTYPE_CHOICES), default="auto",
                               tooltip="Compute precision. auto: fp16 on a GPU (bf16 only where fp16 is missing), on a "
                                       "CPU fp32 with the VAE decoder in bf16 where the CPU has native bf16. Stages "
                                       "that produce NaNs in half precision are retried in fp32."),
            ],
            outputs=[HEADSUP_MODEL.Output(display_name="headsup_model",
                                          tooltip="The loaded model, managed by ComfyUI's model memory manager.")],
        )

    @classmethod
    def execute(cls, weights, base, dtype) -> io.NodeOutput:
        import comfy.model_management as mm
        from headsup_core.pipeline import HeadsUpPipeline

        weights_path = paths.resolve_weights(weights)
        base_path = paths.resolve_base(base)
        load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
        torch_dtype = comfy_dtype(dtype, load_device)
        key = (_stamp(weights_path), _stamp(base_path), str(torch_dtype), str(load_device))
        handle = _MODEL_CACHE.get(key)
        if handle is None:
            log.info("HeadsUp: loading %s on %s (%s)", weights, base, torch_dtype or "per-stage CPU precision")
            pipe = HeadsUpPipeline.from_files(base_path, weights_path, device=offload_device, dtype=torch_dtype,
                                              compute_device=load_device)
            patcher = make_patcher(pipe, load_device, offload_device)
            handle = HeadsUpHandle(pipe=pipe, patcher=patcher, name=f"{weights} on {base}")
        _remember(_MODEL_CACHE, key, handle)
        return io.NodeOutput(handle)


def _device_options(choice, backend="insightface"):
    """Widget -> load_face_analyzer kwargs. auto follows ComfyUI's device (so --cpu keeps faces on the CPU);
    on a GPU ComfyUI, insightface takes the best provider onnxruntime has (plain onnxruntime is common there),
    while an explicit GPU provider that is missing stays an error."""
    import comfy.model_management as mm

    if choice == "auto":
        device = mm.get_torch_device()
        if backend == "facexlib" or torch.device(device).type == "cpu":
            return dict(device=str(device))
        return dict(device=None)
    return dict(providers=[_ORT_PROVIDERS[choice]], device="cpu" if choice == "CPU" else "cuda")


def _load_cached_auto_or_dlib(backend, pack, provider, is_facexlib_pack):
    """dlib runs on the CPU from its registry package; auto tries the chosen insightface pack (when it is on
    disk), then dlib, then facexlib weights from models/facedetection, in the core's order."""
    from headsup_core.errors import MissingModelError
    from headsup_core.faces.analyzer import choose_face_analyzer

    insightface_root = None
    if backend == "auto" and not is_facexlib_pack:
        try:
            insightface_root = paths.resolve_insightface_root(pack)
        except MissingModelError:
            insightface_root = None  # not on disk: auto moves on to dlib
    facexlib = paths.facexlib_root() if backend == "auto" else None
    kwargs = _device_options(provider, "insightface") if insightface_root else {}
    key = (backend, insightface_root, facexlib, pack if insightface_root else None, provider)
    analyzer = _ANALYZER_CACHE.get(key)
    if analyzer is None:
        analyzer = choose_face_analyzer(backend, insightface_root=insightface_root, facexlib_root=facexlib,
                                        pack=pack if insightface_root else None, required=True, **kwargs)
    _remember(_ANALYZER_CACHE, key, analyzer)
    return analyzer


class HeadsUpFaceAnalysisLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HeadsUpFaceAnalysisLoader",
            display_name="HeadsUp Face Analysis Loader",
            category="HeadsUp",
            description="Loads a face detector + identity model used to place references and build the face mask.",
            inputs=[
                io.Combo.Input("backend", options=FACE_BACKENDS, default="auto",
                               tooltip="auto: the first available of an insightface pack (the one chosen below, "
                                       "if present), dlib (installed with this pack; commercial use allowed), then "
                                       "facexlib weights; the choice and its licence are logged. insightface: ONNX "
                                       "packs (detection + ArcFace identity; non-commercial licence). facexlib: "
                                       "RetinaFace/BiSeNet in torch from models/facedetection. dlib: HOG detector, "
                                       "5-point landmarks and ResNet identity from the face-recognition-models "
                                       "package, on the CPU."),
                io.Combo.Input("pack", options=paths.list_face_packs(),
                               tooltip="insightface: a pack from models/insightface/models/<pack>/ (antelopev2, "
                                       "buffalo_l, ...). facexlib: a 'facexlib/...' RetinaFace detector, read from "
                                       "models/facedetection (facexlib gives no identity: one reference goes "
                                       "to the largest face; group references need insightface)."),
                io.Combo.Input("provider", options=PROVIDERS, default="auto",
                               tooltip="Where face analysis runs. auto: the best available. A GPU provider that is "
                                       "not installed is an error, never a silent CPU fallback."),
            ],
            outputs=[FACE_ANALYSIS.Output(display_name="face_analysis",
                                          tooltip="Face detector + identity model.")],
        )

    @classmethod
    def execute(cls, backend, pack, provider) -> io.NodeOutput:
        from headsup_core.errors import InputImageError

        is_facexlib_pack = pack.startswith(paths.FACEXLIB_PREFIX)
        if backend in ("auto", "dlib"):
            return io.NodeOutput(_load_cached_auto_or_dlib(backend, pack, provider, is_facexlib_pack))
        if backend == "insightface":
            if is_facexlib_pack:
                raise InputImageError(f"The insightface backend needs an insightface pack, not '{pack}'; choose "
                                      "one such as antelopev2 or buffalo_l, or switch the backend to facexlib.")
            root, kwargs = paths.resolve_insightface_root(pack), dict(pack=pack)
        else:
            if not is_facexlib_pack:
                raise InputImageError(f"The facexlib backend needs a 'facexlib/...' detector in the pack list, "
                                      f"not the insightface pack '{pack}'.")
            if provider in ("DirectML", "CoreML"):
                raise InputImageError(f"facexlib runs in torch and cannot use the {provider} provider; choose "
                                      "auto, CPU, CUDA or ROCm, or use the insightface backend.")
            root, kwargs = paths.facexlib_root(), dict(detector=pack[len(paths.FACEXLIB_PREFIX):])
        kwargs.update(_device_options(provider, backend))
        key = (backend, root, pack, provider, kwargs.get("device"))
        analyzer = _ANALYZER_CACHE.get(key)
        if analyzer is None:
            from headsup_core.faces.analyzer import choose_face_analyzer

            analyzer = choose_face_analyzer(backend, insightface_root=root, facexlib_root=root, **kwargs)
        _remember(_ANALYZER_CACHE, key, analyzer)
        return io.NodeOutput(analyzer)
