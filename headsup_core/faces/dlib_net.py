"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) as a differentiable torch module.

The ``.dat`` that ``face-recognition-models`` installs is read by our own parser of dlib's serialisation format
(``dlib/serialize.h``, ``dlib/dnn/core.h``, ``layers.h``, ``input.h``); dlib itself is not needed at run time.
The network is the one of dlib's ``dnn_face_recognition_ex.cpp``: a 29-conv metric ResNet with ``affine`` layers
(frozen batch norm: ``gamma * x + beta`` per channel) after every conv, 150x150 RGB chips in, a 128-d descriptor
out. Three details decide whether the numbers match dlib's:

* dlib's ``con`` and pooling layers pad by ``size // 2`` only when the stride is 1; strided ones do not pad;
* a down-sampling block adds ``avg_pool(x)`` to the block output with dlib's ``add_prev``, which zero-pads the
  smaller tensor at the end of each dimension (channels 32 -> 64, and 3x3 -> 4x4 rows/columns at 256 channels);
* the input layer subtracts the stored per-channel mean (122.782, 117.001, 104.298) and divides by 256.

Weights: public domain (Davis King, dlib-models).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import WeightsError

CHIP_SIZE = 150
CHIP_PADDING = 0.25  # what dlib's compute_face_descriptor uses around the 5-point template
# dlib's 5-point chip template (get_face_chip_details, dlib/image_transforms/interpolation.h), unit square,
# padding 0: right-eye corners, left-eye corners (image terms), nose bottom.
DLIB_5_TEMPLATE = np.array([[0.8595674595992, 0.2134981538014], [0.6460604764104, 0.2289674387677],
                            [0.1205750620789, 0.2137274526848], [0.3340850613712, 0.2290642403242],
                            [0.4901123135679, 0.6277975316475]])
# (stage width, blocks, first block down-samples), innermost first, as in dnn_face_recognition_ex.cpp
STAGES = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))


def chip_points(size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> np.ndarray:
    """Where ``get_face_chip(img, shape, size, padding)`` puts dlib's 5 landmarks, in chip pixels."""
    return (padding + DLIB_5_TEMPLATE) / (2 * padding + 1) * size


# ------------------------------------------------------------------------------------------ parsing
class _Reader:
    def __init__(self, data: bytes, path):
        self.data, self.pos, self.path = data, 0, path

    def fail(self, what: str):
        raise WeightsError(f"{self.path} is not a dlib face-recognition network ({what} at byte {self.pos}).")

    def int(self) -> int:  # dlib's pack_int: a control byte (size | 0x80 if negative), then little-endian bytes
        if self.pos >= len(self.data):
            self.fail("unexpected end of file")
        ctl = self.data[self.pos]
        size = ctl & 0x0F
        if size == 0 or size > 8 or ctl & 0x70:
            self.fail("bad integer")
        v = int.from_bytes(self.data[self.pos + 1:self.pos + 1 + size], "little")
        self.pos += 1 + size
        return -v if ctl & 0x80 else v

    def float(self) -> float:  # float_details: mantissa and exponent, both as ints
        m = self.int()
        return m * 2.0 ** self.int()

    def str(self) -> str:
        n = self.int()
        s = self.data[self.pos:self.pos + n]
        self.pos += n
        return s.decode("latin-1")

    def bool(self) -> bool:
        c = self.data[self.pos:self.pos + 1]
        self.pos += 1
        if c not in (b"0", b"1"):
            self.fail("bad bool")
        return c == b"1"

    def tensor(self) -> np.ndarray:  # version 2, then n, k, nr, nc, then raw little-endian float32
        if self.int() != 2:
            self.fail("unknown tensor version")
        shape = tuple(self.int() for _ in range(4))
        n = int(np.prod(shape))
        if min(shape) < 0 or self.pos + 4 * n > len(self.data):
            self.fail("truncated tensor")
        arr = np.frombuffer(self.data, "<f4", n, self.pos).reshape(shape)
        self.pos += 4 * n
        return arr

    def alias(self) -> tuple:
        if self.int() != 1:
            self.fail("unknown alias_tensor version")
        return tuple(self.int() for _ in range(4))


def _layer(r: _Reader) -> dict:
    """One layer's details (the part after ``add_layer``'s subnetwork)."""
    name = r.str()
    kind = name.rstrip("_0123456789")
    if kind == "con":
        params = r.tensor().ravel()
        out = dict(kind="con", filters=r.int(), nr=r.int(), nc=r.int(), stride=(r.int(), r.int()),
                   padding=(r.int(), r.int()), w_shape=r.alias(), b_shape=r.alias())
        for _ in range(4):  # learning-rate and weight-decay multipliers
            r.float()
        use_bias = r.bool() if name in ("con_5", "con_6") else True
        if name == "con_6":
            r.bool()  # use_relu: a fused relu only dlib's own fuse pass sets
        nw = int(np.prod(out["w_shape"]))
        out["weight"] = params[:nw].reshape(out["w_shape"])
        out["bias"] = params[nw:nw + out["filters"]] if use_bias else None
        return out
    if kind == "affine":
        params = r.tensor().ravel()
        g, _b = r.alias(), r.alias()
        out = dict(kind="affine", mode=r.int())
        if name == "affine_2":
            r.bool()  # disabled
        n = int(np.prod(g))
        out["gamma"], out["beta"] = params[:n], params[n:2 * n]
        return out
    if kind == "relu":
        if name == "relu_2":
            r.bool()
        return dict(kind="relu")
    if kind in ("max_pool", "avg_pool"):
        return dict(kind=kind, nr=r.int(), nc=r.int(), stride=(r.int(), r.int()), padding=(r.int(), r.int()))
    if name == "add_prev_":
        return dict(kind="add_prev")
    if kind == "fc":
        n_out, n_in = r.int(), r.int()
        params = r.tensor().ravel()
        r.alias(), r.alias()  # weights and biases views: (n_in, n_out) and (1, n_out)
        bias_mode = r.int()
        for _ in range(4):
            r.float()
        use_bias = r.bool() if name == "fc_3" else True
        nw = n_in * n_out
        return dict(kind="fc", n_in=n_in, n_out=n_out, weight=params[:nw].reshape(n_in, n_out),
                    bias=params[nw:nw + n_out] if (bias_mode == 0 and use_bias) else None)
    r.fail(f"unsupported layer {name!r}")


def read_dat(path) -> dict:
    """Parse a dlib ``loss_metric`` network file: {loss, margin, mean, layers (innermost first)}."""
    path = Path(path)
    r = _Reader(path.read_bytes(), path)
    if r.int() != 1:
        r.fail("unknown add_loss_layer version")
    loss = r.str()
    if not loss.startswith("loss_metric"):
        r.fail(f"loss {loss!r}, expected loss_metric")
    margin, dist = (r.float(), r.float()) if loss == "loss_metric_2" else (0.1, 0.75)
    # Versions of the nested layers, outermost first: add_layer 2 (or 1), tag/skip layers 1, and the add_layer
    # holding the input layer (2 or 3) just before the input layer's name.
    versions = []
    while True:
        save = r.pos
        try:
            if r.str().startswith("input_rgb_image"):
                break
        except (WeightsError, UnicodeDecodeError):
            pass
        r.pos = save
        versions.append(r.int())
        if len(versions) > 10000:
            r.fail("no input layer")
    mean = (r.float(), r.float(), r.float())
    r.int(), r.int()  # chip rows and columns
    layers = []
    for i, v in enumerate(reversed([v for v in versions[:-1] if v == 2] + [versions[-1]])):
        layers.append(_layer(r))
        for _ in range(3):  # setup-called, gradient-stale and output-disabled flags
            r.bool()
        for _ in range(3):  # x_grad, cached_output, params_grad (empty in a saved model)
            r.tensor()
        if i == 0 and v >= 3:
            r.int()  # _sample_expansion_factor
    if r.pos != len(r.data):
        r.fail(f"{len(r.data) - r.pos} bytes left over")
    return dict(loss=loss, margin=margin, distance_threshold=dist, mean=mean, layers=layers)


# ------------------------------------------------------------------------------------------ the network
def _pad_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: the sum over the larger of each dimension, the smaller tensor zero-padded at the end."""
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def pad(t):
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return pad(a) + pad(b)


class _Affine(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("gamma", torch.ones(1, channels, 1, 1))
        self.register_buffer("beta", torch.zeros(1, channels, 1, 1))

    def forward(self, x):
        return x * self.gamma + self.beta


class _Block(nn.Module):
    """relu(add_prev(affine(con(relu(affine(con(x)))))), shortcut)); the shortcut is avg_pool(x) when strided."""

    def __init__(self, cin: int, cout: int, down: bool):
        super().__init__()
        self.down = down
        self.conv1 = nn.Conv2d(cin, cout, 3, 2 if down else 1, 0 if down else 1)
        self.aff1 = _Affine(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.aff2 = _Affine(cout)

    def forward(self, x):
        y = self.aff2(self.conv2(F.relu(self.aff1(self.conv1(x)))))
        return F.relu(_pad_add(y, F.avg_pool2d(x, 2, 2) if self.down else x))


class DlibFaceNet(nn.Module):
    """Bx3x150x150 float RGB chips in 0..255 (as ``dlib.get_face_chip`` returns them) -> Bx128 descriptors,
    the vectors ``dlib.face_recognition_model_v1.compute_face_descriptor`` returns (not normalised; their norm is
    about 1.4-1.6 and dlib compares them by Euclidean distance, same person below 0.6)."""

    identity_kind = "dlib_resnet_v1"
    input_size = CHIP_SIZE

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([122.782, 117.001, 104.298]).view(1, 3, 1, 1))
        self.stem = nn.Conv2d(3, 32, 7, 2, 0)
        self.stem_aff = _Affine(32)
        blocks, cin = [], 32
        for width, n, down in STAGES:
            for i in range(n):
                blocks.append(_Block(cin, width, down and i == 0))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(256, 128, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2:] != (CHIP_SIZE, CHIP_SIZE):
            raise ValueError(f"dlib's face network takes Bx3x{CHIP_SIZE}x{CHIP_SIZE} RGB chips, got "
                             f"{tuple(x.shape)}.")
        x = (x.to(self.mean.dtype) - self.mean) / 256.0
        x = F.max_pool2d(F.relu(self.stem_aff(self.stem(x))), 3, 2)
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))

    def load_dat(self, path) -> "DlibFaceNet":
        """Copy the weights of a parsed ``.dat`` into this module, checking every layer against the architecture."""
        net = read_dat(path)
        layers = net["layers"]
        convs = [self.stem] + [c for b in self.blocks for c in (b.conv1, b.conv2)]
        affs = [self.stem_aff] + [a for b in self.blocks for a in (b.aff1, b.aff2)]
        kinds = [layer["kind"] for layer in layers]
        expected = (["con", "affine", "relu", "max_pool"]
                    + sum((["con", "affine", "relu", "con", "affine"] + (["avg_pool"] if b.down else [])
                           + ["add_prev", "relu"] for b in self.blocks), []) + ["avg_pool", "fc"])
        if kinds != expected or net["mean"] is None:
            raise WeightsError(f"{path}: layer sequence differs from dlib_face_recognition_resnet_model_v1 "
                               f"({len(kinds)} layers, expected {len(expected)}).")
        self.mean.copy_(torch.tensor(net["mean"], dtype=torch.float32).view(1, 3, 1, 1))
        con = [layer for layer in layers if layer["kind"] == "con"]
        aff = [layer for layer in layers if layer["kind"] == "affine"]
        for m, c in zip(convs, con):
            want = (m.stride, m.padding)
            if tuple(c["weight"].shape) != tuple(m.weight.shape) or (c["stride"], c["padding"]) != want:
                raise WeightsError(f"{path}: a conv layer has shape {c['weight'].shape}, stride {c['stride']}, "
                                   f"padding {c['padding']}; expected {tuple(m.weight.shape)}, {want}.")
            m.weight.data.copy_(torch.from_numpy(c["weight"].copy()))
            m.bias.data.copy_(torch.from_numpy(c["bias"].copy()) if c["bias"] is not None else 0)
        for m, a in zip(affs, aff):
            m.gamma.copy_(torch.from_numpy(a["gamma"].copy()).view_as(m.gamma))
            m.beta.copy_(torch.from_numpy(a["beta"].copy()).view_as(m.beta))
        fc = layers[-1]
        if (fc["n_in"], fc["n_out"]) != (256, 128) or fc["bias"] is not None:
            raise WeightsError(f"{path}: final fc is {fc['n_in']}->{fc['n_out']}, expected fc_no_bias 256->128.")
        self.fc.weight.data.copy_(torch.from_numpy(fc["weight"].T.copy()))  # dlib computes x @ W (in x out)
        return self
