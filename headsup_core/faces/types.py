"""Plain data types shared by the face backends, reference encoding and conditioning."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class DetectedFace:
    """One detected face in image pixel coordinates."""

    bbox: np.ndarray  # (4,) float32 xyxy
    kps: np.ndarray  # (5, 2) float32: left eye, right eye, nose, left mouth, right mouth (insightface order)
    det_score: float
    embedding: np.ndarray | None = None  # (512,) float32, L2-normalised; None when the backend has no recognizer

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = (float(v) for v in self.bbox)
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)

    def scaled(self, sx: float, sy: float) -> DetectedFace:
        """The same face in an image resized by (sx, sy); points use pixel-centre coordinates."""
        bbox = self.bbox.astype(np.float32) * np.array([sx, sy, sx, sy], np.float32)
        kps = (self.kps.astype(np.float32) + 0.5) * np.array([sx, sy], np.float32) - 0.5
        return DetectedFace(bbox=bbox, kps=kps, det_score=self.det_score, embedding=self.embedding)


@dataclass
class Reference:
    """An identity reference: one aligned face crop plus its identity embedding."""

    crop: np.ndarray  # (512, 512, 3) uint8 RGB, FFHQ-style alignment
    kps: np.ndarray  # (5, 2) float32 landmarks in crop coordinates
    embedding: np.ndarray | None  # (512,) float32 L2-normalised mean identity of all photos, or None
    sharpness: float = 0.0  # variance of the Laplacian of the chosen crop
    frontal: float = 1.0  # 1 = landmarks fit the frontal template exactly, towards 0 for profiles
    source: str = ""  # which photo the crop came from (file name or "image N")
    num_images: int = 1

    @property
    def score(self) -> float:
        """The crop quality used to choose among several photos: frontal first, then sharp."""
        return float(self.frontal) * float(self.sharpness) / (float(self.sharpness) + 100.0)


@dataclass
class FaceCondition:
    """What the pipeline feeds to the UNet's extra channels, plus a report of which reference went where."""

    canvas: Any  # torch.float32 1x3xHxW in [-1, 1], 0 outside the placed references
    mask: Any  # torch.float32 1x1xHxW in [0, 1], soft face regions
    assignments: list[dict] = field(default_factory=list)  # face_index, box, reference_index, similarity
    has_reference: bool = False
