"""HeadsUpTagger: OSEDiff's DAPE tags of an image (IMAGE -> STRING), for HeadsUpUpscale's ``tags`` input.

The network is read on first use, cached at module level (node classes are cloned per run) and handed to
ComfyUI's model manager as a ModelPatcher, so it is loaded to the GPU for the run and offloaded when memory is
needed elsewhere.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict

from comfy_api.latest import io

from . import paths

log = logging.getLogger("HeadsUp")
NO_DAPE = "none (plain RAM)"
_CACHE: OrderedDict = OrderedDict()  # (ram, dape) stamps -> (DapeTagger, ModelPatcher)


def _default(options, name):
    return name if name in options else (options[0] if options else None)


def _tagger(ram_name, dape_name):
    import comfy.model_management as mm
    import comfy.model_patcher
    from headsup_core.tags import DapeTagger

    ram = paths.resolve_ram(ram_name)
    dape = None if dape_name == NO_DAPE else paths.resolve_ram(dape_name)
    key = tuple((os.path.abspath(p), os.path.getmtime(p)) for p in (ram, dape) if p)
    if key not in _CACHE:
        folder = os.path.dirname(ram)
        tagger = DapeTagger(ram=ram, dape=dape, use_dape=dape is not None, device="cpu",
                            tag_list=os.path.join(folder, "ram_tag_list.txt"),
                            thresholds=os.path.join(folder, "ram_tag_list_threshold.txt"), unload_after=False)
        tagger.load()
        patcher = comfy.model_patcher.ModelPatcher(tagger.net, load_device=mm.get_torch_device(),
                                                   offload_device=mm.unet_offload_device())
        _CACHE[key] = (tagger, patcher)
        while len(_CACHE) > 1:
            _CACHE.popitem(last=False)
    return _CACHE[key]


class HeadsUpTagger(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from headsup_core.tags.files import DAPE_WEIGHTS, RAM_WEIGHTS

        weights = paths.list_ram_weights()
        dapes = [*weights, NO_DAPE]
        return io.Schema(
            node_id="HeadsUpTagger",
            display_name="HeadsUp Tagger (DAPE)",
            category="HeadsUp",
            description="OSEDiff's language description extraction: the RAM tags (DAPE-tuned for degraded "
                        "images) of the low-quality input, for HeadsUp Upscale's tags input.",
            inputs=[
                io.Image.Input("image", tooltip="The low-quality image(s) to tag (the upscaler's input)."),
                io.Combo.Input("ram", options=weights, default=_default(weights, RAM_WEIGHTS),
                               tooltip=f"RAM weights ({RAM_WEIGHTS}) from models/ram, with ram_tag_list.txt and "
                                       "ram_tag_list_threshold.txt beside them."),
                io.Combo.Input("dape", options=dapes, default=_default(dapes, DAPE_WEIGHTS),
                               tooltip=f"OSEDiff's DAPE LoRA ({DAPE_WEIGHTS}) from models/ram, loaded over the RAM "
                                       "weights as OSEDiff does; 'none' tags with plain RAM."),
            ],
            outputs=[io.String.Output(display_name="tags",
                                      tooltip="The tags joined with ', ' (one line per image of a batch).")],
        )

    @classmethod
    def execute(cls, image, ram, dape) -> io.NodeOutput:
        import comfy.model_management as mm

        tagger, patcher = _tagger(ram, dape)
        mm.load_models_gpu([patcher], force_full_load=True)
        lines = tagger.tag(image.movedim(-1, 1)[:, :3])
        for i, tags in enumerate(lines):
            log.info("HeadsUp tagger image %d: %s", i, tags or "(no tag)")
        return io.NodeOutput("\n".join(lines))
