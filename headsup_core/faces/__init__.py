"""Faces: detection, alignment, identity, face masks and the reference mechanism (DESIGN §1).

Typical use::

    analyzer = load_face_analyzer("auto")  # an insightface pack, else dlib (from pip), else facexlib
    ref = encode_reference(["me1.jpg", "me2.jpg"], analyzer)
    cond = build_face_condition(lq_rgb, (h * 4, w * 4), analyzer, references=[ref])
    # cond.canvas (1x3xHxW, [-1, 1]) is VAE-encoded into the reference latent, cond.mask marks the faces,
    # cond.assignments reports which reference went on which face.

Heavy dependencies (insightface, onnxruntime, facexlib, dlib, torchvision, OpenCV, scikit-image) are imported only
when a function needs them.
"""
from .analyzer import BACKENDS, find_backends, load_auto, load_face_analyzer
from .common import FaceAnalyzer
from .identity_net import load_identity_network
from .identity import MATCH_THRESHOLD, SAME_PERSON_THRESHOLD, similarity, to_common
from .condition import build_face_condition, format_assignments, match_references
from .reference import as_references, encode_reference
from .types import DetectedFace, FaceCondition, Reference

__all__ = ["BACKENDS", "MATCH_THRESHOLD", "SAME_PERSON_THRESHOLD", "DetectedFace", "FaceAnalyzer", "FaceCondition",
           "Reference", "as_references", "build_face_condition", "encode_reference", "find_backends",
           "format_assignments", "load_auto", "load_face_analyzer", "load_identity_network", "match_references",
           "similarity", "to_common"]
