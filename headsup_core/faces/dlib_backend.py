"""dlib backend: HOG (default) or MMOD-CNN detection, dlib's 5-point landmarks and its 128-d ResNet identity.

Everything comes from the package registry, no manual download: ``dlib-bin`` (a prebuilt dlib wheel; the HOG
detector is compiled into it) and ``face-recognition-models`` (``mmod_human_face_detector.dat``,
``shape_predictor_5_face_landmarks.dat``, ``dlib_face_recognition_resnet_model_v1.dat``). Davis King released
these model files into the public domain (dlib-models README). The package's 68-point predictor is never used:
it is trained on iBUG 300-W, whose licence excludes commercial use.

Landmarks in our convention. dlib's 5-point model marks the two corners of each eye and the bottom of the nose
(subnasale); it has no mouth corners. We report:

* eye centres = the midpoint of each eye's two corners;
* nose tip and mouth corners = the ArcFace template's nose tip and mouth corners placed in the face frame spanned
  by the eye vector and the eye-midpoint -> nose-bottom vector. The nose bottom sits ``NOSE_BOTTOM`` eye
  distances below the eye midpoint (measured with this predictor on insightface's ArcFace-aligned
  ``Tom_Hanks_54745.png``, whose true landmarks are the template), so that vector, divided by ``NOSE_BOTTOM``,
  is one eye distance "down the face"; a turned or tilted head moves the nose bottom and the derived points
  with it.

So the 5-point similarity alignment (references, masks, eval, training crops) is fitted to the three measured
points (two eyes, nose) only; the mouth corners add no information of their own and are marked as derived in
``LANDMARKS_NOTE``.
"""
from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path

import numpy as np

from ..errors import FaceError, MissingDependencyError, MissingModelError, WeightsError
from .align import ARCFACE_112
from .common import AnalyzerBase, check_image, log_licence, normalise
from .types import DetectedFace

log = logging.getLogger(__name__)

DETECTOR_FILE = "mmod_human_face_detector.dat"
PREDICTOR_FILE = "shape_predictor_5_face_landmarks.dat"
RECOGNIZER_FILE = "dlib_face_recognition_resnet_model_v1.dat"
LICENCE = ("dlib face models (HOG detector in dlib: Boost Software License; mmod_human_face_detector, "
           "shape_predictor_5_face_landmarks, dlib_face_recognition_resnet_model_v1: public domain, Davis King); "
           "commercial use allowed.")
LANDMARKS_NOTE = "eyes and nose from dlib's 5 points; mouth corners derived from the ArcFace template"
# Nose bottom (dlib point 4) below the eye midpoint, in eye distances (Tom_Hanks_54745.png, ArcFace-aligned).
NOSE_BOTTOM = 0.935
_EYE_MID = (ARCFACE_112[0] + ARCFACE_112[1]) / 2
_EYE_DIST = float(np.linalg.norm(ARCFACE_112[1] - ARCFACE_112[0]))
# Template points (nose tip, mouth corners) in the (eye vector, down vector) frame, in eye distances.
_FRAME_POINTS = (ARCFACE_112[2:] - _EYE_MID) / _EYE_DIST
SMALL_IMAGE = 512  # images with a shorter long side are padded so a face filling the frame keeps some context


def _dlib():
    try:
        import dlib
    except ImportError:
        raise MissingDependencyError("The dlib face backend needs dlib: pip install dlib-bin "
                                     "face-recognition-models (prebuilt wheels, no compiler).") from None
    return dlib


def default_model_dir() -> Path | None:
    """The ``models`` folder of the installed ``face-recognition-models`` package (found without importing it:
    its ``__init__`` imports pkg_resources, which new setuptools no longer ship)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def available() -> bool:
    """dlib and the recognition models are installed (what ``faces='auto'`` checks)."""
    d = default_model_dir()
    return (importlib.util.find_spec("dlib") is not None and d is not None
            and (d / PREDICTOR_FILE).is_file() and (d / RECOGNIZER_FILE).is_file())


def dlib_to_kps(parts: np.ndarray) -> np.ndarray:
    """dlib's 5 points (right-eye corners 0-1, left-eye corners 2-3 in image terms, nose bottom 4) -> our 5
    landmarks: image-left eye centre, image-right eye centre, nose tip, left and right mouth corner."""
    p = np.asarray(parts, np.float64).reshape(5, 2)
    left, right = p[2:4].mean(axis=0), p[0:2].mean(axis=0)
    if left[0] > right[0]:  # keep image-left first, as insightface does, even for a mirrored layout
        left, right = right, left
    mid = (left + right) / 2
    across = right - left
    down = (p[4] - mid) / NOSE_BOTTOM
    derived = mid + _FRAME_POINTS[:, :1] * across + _FRAME_POINTS[:, 1:] * down
    return np.vstack([left, right, derived]).astype(np.float32)


class DlibAnalyzer(AnalyzerBase):
    backend = "dlib"
    identity_kind = "dlib_resnet_v1"
    licence = LICENCE

    def __init__(self, model_dir=None, detector: str = "hog", upsample: int | None = None, det_thresh: float = 0.0,
                 recognizer: bool = True, num_jitters: int = 0):
        dlib = _dlib()
        folder = Path(model_dir).expanduser() if model_dir is not None else default_model_dir()
        if folder is None:
            raise MissingDependencyError("The dlib face backend needs its model files: pip install "
                                         "face-recognition-models (or pass model_root=FOLDER with the .dat files).")
        if detector not in ("hog", "mmod"):
            raise FaceError(f"Unknown dlib detector {detector!r}; use 'hog' (fast, default) or 'mmod' (CNN).")
        self.model_dir, self.detector_name = folder, detector
        self.upsample, self.det_thresh, self.num_jitters = upsample, float(det_thresh), int(num_jitters)
        if detector == "hog":
            self._det = dlib.get_frontal_face_detector()
        else:
            self._det = dlib.cnn_face_detection_model_v1(str(self._file(DETECTOR_FILE, "MMOD face detector")))
        self._sp = dlib.shape_predictor(str(self._file(PREDICTOR_FILE, "5-point landmark")))
        self._rec = (dlib.face_recognition_model_v1(str(self._file(RECOGNIZER_FILE, "face recognition")))
                     if recognizer else None)
        self.has_recognizer = self._rec is not None
        log.info("dlib face analysis (%s detector%s) from %s. Licence: %s", detector,
                 ", ResNet identity" if self.has_recognizer else "", folder, LICENCE)

    def _file(self, name: str, what: str) -> Path:
        path = self.model_dir / name
        if not path.is_file():
            raise MissingModelError(f"dlib {what} model not found: expected {path} (pip install "
                                    "face-recognition-models provides it).")
        if path.stat().st_size < 1024:
            raise WeightsError(f"{path} is truncated; reinstall face-recognition-models.")
        return path

    def _upsample_for(self, long_side: int) -> int:
        if self.upsample is not None:
            return int(self.upsample)
        # HOG's window is 80 px: x2 finds faces down to ~40 px, x4 (tiny inputs) down to ~20 px.
        return 2 if long_side < 300 else 1 if long_side <= 2500 else 0

    def _rects(self, img: np.ndarray, upsample: int):
        if self.detector_name == "hog":
            rects, scores, _ = self._det.run(img, upsample, self.det_thresh)
            return [(r, float(s)) for r, s in zip(rects, scores)]
        return [(d.rect, float(d.confidence)) for d in self._det(img, upsample) if d.confidence >= self.det_thresh]

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        rgb = np.ascontiguousarray(check_image(image))
        h, w = rgb.shape[:2]
        pad = 0
        if max(h, w) < SMALL_IMAGE:  # a tightly cropped face needs context around it for the detector window
            from .align import cv2_module

            pad = int(math.ceil(0.25 * max(h, w)))
            rgb = cv2_module().copyMakeBorder(rgb, pad, pad, pad, pad, cv2_module().BORDER_REPLICATE)
        faces = []
        for rect, score in self._rects(rgb, self._upsample_for(max(rgb.shape[:2]))):
            shape = self._sp(rgb, rect)
            parts = np.array([[p.x, p.y] for p in shape.parts()], np.float64)
            kps = dlib_to_kps(parts) - pad
            box = np.array([rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1], np.float32) - pad
            cx, cy = kps[:2].mean(axis=0)
            if not (0 <= cx < w and 0 <= cy < h):  # a face in the padding only
                continue
            emb = self._descriptor(rgb, shape)
            faces.append(DetectedFace(bbox=self._face_box(box, kps, (h, w)), kps=kps,
                                      det_score=float(1.0 / (1.0 + math.exp(-2.0 * score))), embedding=emb))
        return sorted(faces, key=lambda f: -f.area)

    @staticmethod
    def _face_box(rect: np.ndarray, kps: np.ndarray, hw) -> np.ndarray:
        """dlib's box is tight (brows to lip); grow it to hold every landmark with a margin, like other detectors."""
        eye = float(np.linalg.norm(kps[1] - kps[0]))
        m = 0.35 * eye
        x1, y1 = min(rect[0], kps[:, 0].min() - m), min(rect[1], kps[:, 1].min() - m)
        x2, y2 = max(rect[2], kps[:, 0].max() + m), max(rect[3], kps[:, 1].max() + m)
        h, w = hw
        return np.array([max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)], np.float32)

    def _descriptor(self, rgb: np.ndarray, shape) -> np.ndarray | None:
        if self._rec is None:
            return None
        return normalise(np.asarray(self._rec.compute_face_descriptor(rgb, shape, self.num_jitters)))

    def embed(self, image: np.ndarray, kps: np.ndarray) -> np.ndarray | None:
        """Identity of the face whose landmarks (our convention) are ``kps``: dlib's predictor refines its own 5
        points inside a box placed from ``kps``, then the ResNet describes that face."""
        if self._rec is None:
            return None
        dlib = _dlib()
        rgb = np.ascontiguousarray(check_image(image))
        kps = np.asarray(kps, np.float64).reshape(5, 2)
        eye = float(np.linalg.norm(kps[1] - kps[0]))
        if not eye > 1.0:
            return None
        mid = kps[:2].mean(axis=0)
        half = 1.2 * eye  # dlib's detector boxes are ~2.4 eye distances wide, centred a quarter eye below the eyes
        cx, cy = mid[0], mid[1] + 0.25 * eye
        rect = dlib.rectangle(int(round(cx - half)), int(round(cy - half)), int(round(cx + half)),
                              int(round(cy + half)))
        return self._descriptor(rgb, self._sp(rgb, rect))


def load(model_root=None, **options) -> DlibAnalyzer:
    analyzer = DlibAnalyzer(model_root, **options)
    log_licence(RECOGNIZER_FILE, level=logging.DEBUG)  # the analyzer's own load line states every dlib licence
    return analyzer
