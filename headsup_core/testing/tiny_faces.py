"""Tiny face models in the real on-disk formats, for tests and install checks (no downloads).

``write_tiny_face_models(dir)`` writes:

* ``dir/insightface/models/tiny/det.onnx``: an SCRFD-shaped detector (det_10g layout: 9 outputs, strides
  8/16/32, 2 anchors, fixed 640x640 input). insightface's ``model_zoo`` routes it to its own ``SCRFD`` class,
  whose real letterboxing, anchor decoding and NMS turn its outputs into faces. It is not trained; it is a
  *deterministic* head built from plain ONNX ops:
  it measures the non-black content area of the letterboxed input, splits that area into a row of
  ``round(long side / short side)`` square cells and reports one face per cell, with the five landmarks of the
  ArcFace template scaled to the cell. So an aligned face crop (``Tom_Hanks_54745.png``) gets exactly the
  template landmarks, two aligned crops side by side get two faces, and a landscape photo such as ``t1.jpg``
  (aspect 1.44) gets one face in its centre; an all-black image gets none. Only stride-32 anchors score
  (0.9); every anchor of a cell regresses the same box, so NMS keeps one face per cell. Pure-black borders
  count as padding.
* ``dir/insightface/models/tiny/rec.onnx``: an ArcFace-shaped recognizer (1x3x112x112 -> 512). Its embedding
  is an isometric random projection of the mean-centred 8x8 RGB thumbnail of the aligned face, so identical
  crops give cosine 1 and different crops lower values, deterministically.
* ``dir/facedetection/detection_mobilenet0.25_Final.pth``: facexlib's RetinaFace (mobilenet0.25) state dict,
  random weights (seed 0) with the class head's bias set so that it deterministically reports *no* face. The
  RetinaFace architecture is fixed by facexlib (resnet50 weights are 100 MB, mobilenet0.25 1.7 MB), and a
  location-dependent face head cannot be built from biases alone, so this file tests the real loading and
  decoding code and the "no face" path, not positive detections. BiSeNet parsing (ResNet18, 53 MB) is not
  written for the same reason.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import MissingDependencyError
from ..faces.align import ARCFACE_112

log = logging.getLogger(__name__)

DET_SIZE = 640
STRIDES = (8, 16, 32)
NUM_ANCHORS = 2
# Face box relative to a square cell (x1, y1, x2, y2), roughly where SCRFD boxes an ArcFace-aligned crop.
BOX_IN_CELL = (0.14, 0.10, 0.86, 0.98)


def _onnx():
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise MissingDependencyError("Writing the tiny face models needs the 'onnx' package: "
                                     "pip install onnx") from None
    return onnx, TensorProto, helper, numpy_helper


def _anchor_centres(stride: int) -> np.ndarray:
    """Anchor centres in the order SCRFD decodes them: row-major cells, each repeated per anchor."""
    n = DET_SIZE // stride
    ys, xs = np.mgrid[:n, :n]
    centres = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
    return np.repeat(centres, NUM_ANCHORS, axis=0)


def _detector_model():
    onnx, TP, helper, nh = _onnx()
    nodes, inits = [], []

    def const(name, value):
        if name not in {t.name for t in inits}:
            inits.append(nh.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=f"det_{output}", **attrs))
        return output

    # Content extent of the letterboxed input (padding is pixel 0, i.e. about -0.996 after SCRFD's normalisation).
    node("Greater", ["input.1", const("pad_level", -0.99)], "is_content")
    node("Cast", ["is_content"], "content", to=TP.FLOAT)
    node("ReduceMax", ["content"], "col_any", axes=[0, 1, 2], keepdims=0)
    node("ReduceMax", ["content"], "row_any", axes=[0, 1, 3], keepdims=0)
    idx = const("index1", np.arange(1, DET_SIZE + 1))
    node("Mul", ["col_any", idx], "col_idx")
    node("Mul", ["row_any", idx], "row_idx")
    one = const("one", 1.0)
    node("ReduceMax", ["col_idx"], "wc_raw", keepdims=0)
    node("ReduceMax", ["row_idx"], "hc_raw", keepdims=0)
    node("Max", ["wc_raw", one], "wc")
    node("Max", ["hc_raw", one], "hc")
    node("Min", ["wc", "hc"], "short")
    half = const("half", 0.5)
    for axis, extent in (("x", "wc"), ("y", "hc")):
        node("Div", [extent, "short"], f"ratio_{axis}")
        node("Add", [f"ratio_{axis}", half], f"ratio_{axis}_h")
        node("Floor", [f"ratio_{axis}_h"], f"n_{axis}_raw")
        node("Max", [f"n_{axis}_raw", one], f"n_{axis}")
        node("Div", [extent, f"n_{axis}"], f"cell_{axis}")
    node("Min", ["cell_x", "cell_y"], "face")

    s = 32
    anchors = _anchor_centres(s)
    ax, ay = const("ax", anchors[:, :1]), const("ay", anchors[:, 1:])
    for axis, a in (("x", ax), ("y", ay)):
        node("Div", [a, f"cell_{axis}"], f"q_{axis}")
        node("Floor", [f"q_{axis}"], f"i_{axis}_raw")
        node("Sub", [f"n_{axis}", one], f"n_{axis}_m1")
        node("Min", [f"i_{axis}_raw", f"n_{axis}_m1"], f"i_{axis}")
        node("Add", [f"i_{axis}", half], f"i_{axis}_c")
        node("Mul", [f"i_{axis}_c", f"cell_{axis}"], f"c_{axis}")
    node("Less", [ax, "wc"], "in_x")
    node("Less", [ay, "hc"], "in_y")
    node("And", ["in_x", "in_y"], "in_xy")
    # An (almost) all-black input has no content: no face.
    node("Min", ["wc_raw", "hc_raw"], "short_raw")
    node("Greater", ["short_raw", const("min_content", 8.0)], "has_content")
    node("And", ["in_xy", "has_content"], "valid_b")
    node("Cast", ["valid_b"], "valid", to=TP.FLOAT)
    node("Mul", ["valid", const("score", 0.9)], "score_32")

    def offset(name, centre, rel, anchor):
        """(centre + face * rel - anchor) / stride, or its negation, as SCRFD's distance encoding needs."""
        node("Mul", ["face", const(f"rel_{name}", rel)], f"off_{name}")
        node("Add", [centre, f"off_{name}"], f"pos_{name}")
        node("Sub", [f"pos_{name}", anchor], f"d_{name}")
        return node("Div", [f"d_{name}", const("stride32", float(s))], f"ds_{name}")

    x1, y1, x2, y2 = (v - 0.5 for v in BOX_IN_CELL)
    b = [offset("x1", "c_x", x1, ax), offset("y1", "c_y", y1, ay),
         offset("x2", "c_x", x2, ax), offset("y2", "c_y", y2, ay)]
    node("Neg", [b[0]], "nd_x1")
    node("Neg", [b[1]], "nd_y1")
    node("Concat", ["nd_x1", "nd_y1", b[2], b[3]], "bbox_32", axis=1)
    kps = []
    for k, (tx, ty) in enumerate(ARCFACE_112 / 112.0 - 0.5):
        kps += [offset(f"k{k}x", "c_x", tx, ax), offset(f"k{k}y", "c_y", ty, ay)]
    node("Concat", kps, "kps_32", axis=1)

    # Strides 8 and 16 report nothing: constant zero scores and offsets.
    for stride in (8, 16):
        n = (DET_SIZE // stride) ** 2 * NUM_ANCHORS
        for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)):
            shape = f"shape_{kind}_{stride}"
            inits.append(nh.from_array(np.array([n, width], dtype=np.int64), shape))
            nodes.append(helper.make_node("ConstantOfShape", [shape], [f"{kind}_{stride}"], name=f"det_{kind}_{stride}",
                                          value=nh.from_array(np.zeros(1, np.float32))))
    outputs = []
    for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)):
        for stride in STRIDES:
            n = (DET_SIZE // stride) ** 2 * NUM_ANCHORS
            outputs.append(helper.make_tensor_value_info(f"{kind}_{stride}", TP.FLOAT, [n, width]))
    graph = helper.make_graph(nodes, "headsup_tiny_scrfd",
                              [helper.make_tensor_value_info("input.1", TP.FLOAT, [1, 3, DET_SIZE, DET_SIZE])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="headsup-tiny")
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def _recognizer_model(seed: int = 0):
    onnx, TP, helper, nh = _onnx()
    feat = 3 * 8 * 8
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((512, feat)))  # orthonormal columns: the projection keeps cosines
    inits = [nh.from_array(q.T.astype(np.float32), "proj")]
    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["pooled"], name="rec_pool", kernel_shape=[14, 14],
                         strides=[14, 14]),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="rec_flat", axis=1),
        helper.make_node("ReduceMean", ["flat"], ["mean"], name="rec_mean", axes=[1], keepdims=1),
        helper.make_node("Sub", ["flat", "mean"], ["centred"], name="rec_centre"),
        helper.make_node("MatMul", ["centred", "proj"], ["683"], name="rec_proj"),
    ]
    graph = helper.make_graph(nodes, "headsup_tiny_arcface",
                              [helper.make_tensor_value_info("input.1", TP.FLOAT, ["None", 3, 112, 112])],
                              [helper.make_tensor_value_info("683", TP.FLOAT, ["None", 512])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="headsup-tiny")
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def _write_tiny_retinaface(path: Path) -> None:
    """Random mobilenet0.25 RetinaFace whose class head says 'background' everywhere."""
    import torch

    from ..faces.facexlib_backend import build_retinaface

    torch.manual_seed(0)
    net = build_retinaface("retinaface_mobile0.25", device="cpu")
    with torch.no_grad():
        for head in net.ClassHead:
            head.conv1x1.weight.zero_()
            bias = head.conv1x1.bias.view(-1, 2)  # (anchor, [background, face]) logits
            bias[:, 0] = 10.0
            bias[:, 1] = -10.0
    torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, path)


def write_tiny_face_models(dir) -> dict[str, Path]:
    """Write the tiny insightface pack (and, when facexlib is installed, tiny facexlib weights) under ``dir``."""
    onnx = _onnx()[0]
    root = Path(dir)
    pack = root / "insightface" / "models" / "tiny"
    pack.mkdir(parents=True, exist_ok=True)
    onnx.save(_detector_model(), str(pack / "det.onnx"))
    onnx.save(_recognizer_model(), str(pack / "rec.onnx"))
    out = {"insightface_root": root / "insightface", "insightface_pack": pack,
           "insightface_det": pack / "det.onnx", "insightface_rec": pack / "rec.onnx"}
    facedet = root / "facedetection"
    try:
        facedet.mkdir(parents=True, exist_ok=True)
        _write_tiny_retinaface(facedet / "detection_mobilenet0.25_Final.pth")
        out["facexlib_dir"] = facedet
        out["facexlib_retinaface"] = facedet / "detection_mobilenet0.25_Final.pth"
    except MissingDependencyError as err:  # facexlib/torchvision absent: the insightface pack is still useful
        log.info("Tiny facexlib weights not written: %s", err)
    return out
