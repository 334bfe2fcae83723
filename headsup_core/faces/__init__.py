"""Faces: detection, alignment, identity, face masks and the reference mechanism (DESIGN §1).

Typical use::

    analyzer = load_face_analyzer("insightface", model_root="models/insightface")
    ref = encode_reference(["me1.jpg", "me2.jpg"], analyzer)
    cond = build_face_condition(lq_rgb, (h * 4, w * 4), analyzer, references=[ref])
    # cond.canvas (1x3xHxW, [-1, 1]) is VAE-encoded into the reference latent, cond.mask marks the faces,
    # cond.assignments reports which reference went on which face.

Heavy dependencies (insightface, onnxruntime, facexlib, torchvision, OpenCV, scikit-image) are imported only
when a function needs them.
"""
from .analyzer import FaceAnalyzer, load_face_analyzer
from .condition import build_face_condition, format_assignments, match_references
from .reference import as_references, encode_reference
from .types import DetectedFace, FaceCondition, Reference

__all__ = ["DetectedFace", "FaceAnalyzer", "FaceCondition", "Reference", "as_references", "build_face_condition",
           "encode_reference", "format_assignments", "load_face_analyzer", "match_references"]
