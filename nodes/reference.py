"""HeadsUpReferenceEncoder: reference photos of one person -> an aligned, identity-embedded reference."""
from dataclasses import dataclass

import torch
from comfy_api.latest import io

from .loaders import FACE_ANALYSIS

HEADSUP_REFERENCE = io.Custom("HEADSUP_REFERENCE")


@dataclass(frozen=True)
class ReferenceSet:
    """What travels on a HEADSUP_REFERENCE wire: one Reference per person, and the analyzer that made them
    (HeadsUpUpscale reuses it to find the faces in the image when no face_analysis is connected)."""
    references: tuple
    analyzer: object


class HeadsUpReferenceEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HeadsUpReferenceEncoder",
            display_name="HeadsUp Reference Encoder",
            category="HeadsUp",
            description="Encodes good photos of ONE person as an identity reference. Chain encoders (one per "
                        "person) for group portraits; each reference goes to the face it matches best.",
            inputs=[
                io.Image.Input("image", tooltip="One or more sharp photos of the same person (an image batch). "
                                                "The largest face is used; with several photos, the faces "
                                                "that agree on identity are averaged."),
                FACE_ANALYSIS.Input("face_analysis", tooltip="From HeadsUp Face Analysis Loader."),
                HEADSUP_REFERENCE.Input("previous", optional=True,
                                        tooltip="References of other people (from another encoder) to combine "
                                                "with this one, for group portraits."),
            ],
            outputs=[
                HEADSUP_REFERENCE.Output(display_name="reference",
                                         tooltip="This person's reference, after any previous ones."),
                io.Image.Output(display_name="aligned_face", tooltip="The aligned 512x512 face crop that is used."),
            ],
        )

    @classmethod
    def execute(cls, image, face_analysis, previous=None) -> io.NodeOutput:
        import comfy.model_management as mm
        from headsup_core.faces import encode_reference
        from headsup_core.imageio import to_uint8_rgb

        photos = [to_uint8_rgb(image[i:i + 1]) for i in range(image.shape[0])]
        ref = encode_reference(photos, face_analysis)
        refs = (tuple(previous.references) if previous is not None else ()) + (ref,)
        preview = torch.from_numpy(ref.crop.copy()).float().div(255.0).unsqueeze(0)
        return io.NodeOutput(ReferenceSet(references=refs, analyzer=face_analysis),
                             preview.to(mm.intermediate_device()))
