"""The HeadsUp ComfyUI nodes (V3 API). Imported only by the pack's comfy_entrypoint, i.e. inside ComfyUI."""
from comfy_api.latest import ComfyExtension, io

from . import paths

paths.register_folders()

from .loaders import HeadsUpFaceAnalysisLoader, HeadsUpLoader  # noqa: E402  (folders must exist first)
from .reference import HeadsUpReferenceEncoder  # noqa: E402
from .upscale import HeadsUpUpscale  # noqa: E402
from .blend_node import HeadsUpBlendUpscale  # noqa: E402
from .patch_node import HeadsUpPatchModel  # noqa: E402
from .tagger import HeadsUpTagger  # noqa: E402

NODES = [HeadsUpLoader, HeadsUpFaceAnalysisLoader, HeadsUpReferenceEncoder, HeadsUpUpscale, HeadsUpBlendUpscale,
         HeadsUpPatchModel, HeadsUpTagger]


class HeadsUpExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
