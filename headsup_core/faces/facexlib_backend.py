"""facexlib backend: RetinaFace detection and optional BiSeNet parsing, in torch on the host's device.

Weights are read from one folder (ComfyUI: ``models/facedetection``) with ``torch.load(weights_only=True)``;
facexlib's own ``init_*_model`` helpers are not used because they download into site-packages when a file is
missing. facexlib has no ArcFace-style recognizer; pass ``recognizer=`` (an insightface recognition .onnx or a pack
folder) for identity, otherwise faces get ``embedding=None``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import MissingDependencyError, MissingModelError, WeightsError
from .common import AnalyzerBase, check_image, embed_with_arcface, log_licence, normalise, resolve_providers
from .types import DetectedFace

log = logging.getLogger(__name__)

DETECTOR_FILES = {"retinaface_resnet50": "detection_Resnet50_Final.pth",
                  "retinaface_mobile0.25": "detection_mobilenet0.25_Final.pth"}
PARSING_FILE = "parsing_bisenet.pth"
# BiSeNet (CelebAMask-HQ) labels that belong to the face: skin, brows, eyes, glasses, nose, mouth, lips.
FACE_LABELS = (1, 2, 3, 4, 5, 6, 10, 11, 12, 13)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MAX_DET_SIDE = 1280  # detect on a downscaled copy of larger images; RetinaFace runs at the given size


def _facexlib_import(what: str):
    try:
        if what == "retinaface":
            from facexlib.detection.retinaface import RetinaFace  # imports torchvision (IntermediateLayerGetter, nms)
            return RetinaFace
        from facexlib.parsing.bisenet import BiSeNet
        return BiSeNet
    except ImportError as err:
        pkg = "torchvision" if "torchvision" in str(err) else "facexlib"
        raise MissingDependencyError(f"The facexlib face backend needs {pkg}: pip install {pkg} ({err}).") from None


def build_retinaface(name: str, device="cpu"):
    if name not in DETECTOR_FILES:
        raise WeightsError(f"Unknown facexlib detector {name!r}; use one of {sorted(DETECTOR_FILES)}.")
    RetinaFace = _facexlib_import("retinaface")
    return RetinaFace(network_name=name.split("_", 1)[1], half=False, device=device)


def _load_state(path: Path) -> dict:
    from ..loading.weight_files import torch_load_safely

    state = torch_load_safely(str(path))
    if isinstance(state, dict) and "params" in state and isinstance(state["params"], dict):
        state = state["params"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def _required_file(folder: Path, name: str, what: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise MissingModelError(f"facexlib {what} weights not found: expected {path}. Download {name} from "
                                "https://github.com/xinntao/facexlib/releases and put it in that folder.")
    return path


class FacexlibAnalyzer(AnalyzerBase):
    backend = "facexlib"

    def __init__(self, model_dir, device=None, detector: str = "retinaface_resnet50", parsing: bool = False,
                 det_thresh: float = 0.8, recognizer=None, providers=None):
        import torch

        if model_dir is None:
            raise MissingModelError("The facexlib backend needs the folder that holds its weights (ComfyUI: "
                                    "models/facedetection); pass model_root=FOLDER.")
        self.model_dir = Path(model_dir).expanduser()
        if detector not in DETECTOR_FILES:
            raise WeightsError(f"Unknown facexlib detector {detector!r}; use one of {sorted(DETECTOR_FILES)}.")
        det_path = _required_file(self.model_dir, DETECTOR_FILES[detector], "RetinaFace detector")
        parse_path = _required_file(self.model_dir, PARSING_FILE, "BiSeNet parsing") if parsing else None
        self.device = torch.device(device or "cpu")
        self.det_thresh = float(det_thresh)
        net = build_retinaface(detector, device="cpu")
        try:
            net.load_state_dict(_load_state(det_path), strict=True)
        except RuntimeError as err:
            raise WeightsError(f"{det_path} does not match facexlib's {detector}: {str(err)[:200]}") from None
        net.device = self.device  # RetinaFace keeps its own device for the tensors it builds while decoding
        net.mean_tensor = net.mean_tensor.to(self.device)
        self.net = net.to(self.device).eval()
        self.parser = None
        if parse_path is not None:
            BiSeNet = _facexlib_import("bisenet")
            parser = BiSeNet(num_class=19)
            try:
                parser.load_state_dict(_load_state(parse_path), strict=True)
            except RuntimeError as err:
                raise WeightsError(f"{parse_path} does not match facexlib's BiSeNet: {str(err)[:200]}") from None
            self.parser = parser.to(self.device).eval()
        for path in (det_path, parse_path):
            if path is not None:
                self.licence = log_licence(path) or self.licence
        self.rec_model = self._load_recognizer(recognizer, providers, device) if recognizer is not None else None
        self.has_recognizer = self.rec_model is not None

    @staticmethod
    def _load_recognizer(recognizer, providers, device):
        """An insightface ArcFace .onnx (or the recognizer of a pack folder), routed by insightface's model_zoo."""
        try:
            from insightface.model_zoo import model_zoo
        except ImportError:
            raise MissingDependencyError("Identity with the facexlib backend uses an insightface recognizer: "
                                         "pip install insightface onnxruntime") from None
        path = Path(recognizer).expanduser()
        candidates = sorted(path.glob("*.onnx")) if path.is_dir() else [path]
        if not all(p.is_file() for p in candidates) or not candidates:
            raise MissingModelError(f"insightface recognizer not found: expected an ArcFace .onnx at {path}.")
        provs = resolve_providers(providers, device)
        for onnx_file in candidates:
            model = model_zoo.get_model(str(onnx_file), providers=provs)
            if model is not None and model.taskname == "recognition":
                model.prepare(ctx_id=0)
                return model
        raise MissingModelError(f"No face recognizer (ArcFace .onnx) found at {path}.")

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        import torch

        rgb = check_image(image)
        h, w = rgb.shape[:2]
        scale = min(1.0, MAX_DET_SIDE / max(h, w))
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        if scale < 1.0:
            from .align import cv2_module

            cv2 = cv2_module()
            bgr = cv2.resize(bgr, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        with torch.inference_mode():
            dets = self.net.detect_faces(bgr, conf_threshold=self.det_thresh, use_origin_size=True)
        faces = []
        for row in np.asarray(dets, np.float32).reshape(-1, 15):
            kps = row[5:15].reshape(5, 2) / scale
            emb = embed_with_arcface(self.rec_model, rgb, kps) if self.rec_model is not None else None
            faces.append(DetectedFace(bbox=row[:4] / scale, kps=kps, det_score=float(row[4]), embedding=emb))
        return sorted(faces, key=lambda f: -f.area)

    def embed(self, image: np.ndarray, kps: np.ndarray):
        return normalise(embed_with_arcface(self.rec_model, image, kps)) if self.rec_model is not None else None

    def parse_mask(self, crop: np.ndarray) -> np.ndarray | None:
        """Soft face mask (512x512 float32, 0..1) of an FFHQ-aligned 512² RGB crop, from BiSeNet parsing."""
        if self.parser is None:
            return None
        import torch

        # As facexlib's own inference_parsing: [0, 1] then ImageNet mean/std, at 512x512.
        x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float().div(255.0)
        x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        with torch.inference_mode():
            labels = self.parser(x.to(self.device))[0].argmax(dim=1)[0].cpu().numpy()
        return np.isin(labels, FACE_LABELS).astype(np.float32)
