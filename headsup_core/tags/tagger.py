"""``DapeTagger``: OSEDiff's language description extraction (RAM tags, DAPE-tuned), usable as ``tag_source``.

Per image, as OSEDiff's ``test_osediff.py`` does: the 0..1 RGB image is resized to 384x384 (bilinear with
antialias, what ``transforms.Resize`` does to a tensor), normalised with ImageNet's mean/std, run through
RAM's Swin-L + tagging head; a tag is kept when its sigmoid is above its class threshold; the kept tags, minus
``delete_tag_index``, are joined with ", " in class order. The pipeline then encodes ``f"{tags}, {prompt},"``.

The network is built and its weights read on first use, and can be released (``unload``) to give the memory
back before the UNet runs.
"""
from __future__ import annotations

import logging
import threading
import time

import torch
import torch.nn.functional as F

from .. import devices
from .files import TaggerFiles, describe, find_tagger_files, read_vocabulary, tagging_state_dict

log = logging.getLogger("headsup")
IMAGE_SIZE = 384
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OSEDIFF_UPSCALE, OSEDIFF_PROCESS_SIZE = 4, 512  # test_osediff.py's defaults


def preprocess(image: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(B, 3, H, W) in 0..1 -> (B, 3, size, size), normalised as RAM expects."""
    x = F.interpolate(image.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def osediff_input(image: torch.Tensor, upscale: int = OSEDIFF_UPSCALE,
                  process_size: int = OSEDIFF_PROCESS_SIZE) -> torch.Tensor:
    """What OSEDiff's test_osediff.py tags: the 8-bit input, first enlarged (bicubic) so its short side is at least
    ``process_size // upscale`` when smaller, then resized x``upscale`` (bicubic) and to a multiple of 8 (LANCZOS),
    all with PIL; back as a (1, 3, H, W) 0..1 tensor."""
    import numpy as np
    from PIL import Image

    arr = (image[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    w, h = img.size
    if w < process_size // upscale or h < process_size // upscale:
        scale = (process_size // upscale) / min(w, h)
        img = img.resize((int(scale * w), int(scale * h)), Image.BICUBIC)
    img = img.resize((img.size[0] * upscale, img.size[1] * upscale), Image.BICUBIC)
    img = img.resize((img.width - img.width % 8, img.height - img.height % 8), Image.LANCZOS)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255


def build_net(state: dict, device=None, dtype=torch.float32):
    """A ``RamTaggingNet`` holding ``state`` (names and shapes as ``tagging_state_dict`` returns them)."""
    from .head import HeadConfig, RamTaggingNet
    from .swin import SwinConfig, make_buffers

    swin = SwinConfig.from_state_dict(state, "visual_encoder.")
    head = HeadConfig.from_state_dict(state)
    with torch.device("meta"):
        net = RamTaggingNet(swin, head)
    net.load_state_dict(state, strict=True, assign=True)
    make_buffers(net)
    return net.to(device=device, dtype=dtype).eval().requires_grad_(False)


class DapeTagger:
    """Callable tag source: ``tagger(image) -> "tag, tag, ..."`` for a (1, 3, H, W) 0..1 tensor.

    ``DapeTagger(root=None, ram=None, dape=None, ...)`` finds the files (``tags.files``); ``use_dape=False`` tags
    with plain RAM. ``osediff_resize`` (default) tags what test_osediff.py tags (``osediff_input``: the input
    enlarged x4 with PIL); False tags the image as given. ``unload_after`` releases the network after every call (``None``: when the device's free
    memory is short). ``last_tags`` holds the tags of the latest call.
    """

    def __init__(self, root=None, ram=None, dape=None, tag_list=None, thresholds=None, *, use_dape: bool = True,
                 device=None, dtype=torch.float32, delete_tag_index=(), unload_after: bool | None = None,
                 osediff_resize: bool = True, files: TaggerFiles | None = None):
        self.files = files or find_tagger_files(root, ram, dape, tag_list, thresholds, use_dape=use_dape)
        self.device = devices.pick_device(device)
        self.dtype = dtype
        self.delete_tag_index = tuple(int(i) for i in delete_tag_index)
        self.unload_after = unload_after
        self.osediff_resize = osediff_resize
        self.net = None
        self.tags = self.thresholds = None
        self.last_tags: str | None = None
        self.load_seconds = 0.0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------- loading
    def load(self) -> "DapeTagger":
        with self._lock:
            if self.net is None:
                t0 = time.perf_counter()
                state = tagging_state_dict(self.files.ram, self.files.dape)
                tags, thresholds = read_vocabulary(self.files, int(state["label_embed"].shape[0]))
                self.net = build_net(state, self.device, self.dtype)
                self.tags, self.thresholds = tags, thresholds
                self.load_seconds = time.perf_counter() - t0
                log.info("HeadsUp: DAPE tagger loaded from %s in %.1f s", describe(self.files), self.load_seconds)
        return self

    def unload(self) -> None:
        self.net = None

    @property
    def loaded(self) -> bool:
        return self.net is not None

    def size_bytes(self) -> int:
        net = self.load().net
        return sum(p.numel() * p.element_size() for p in net.parameters())

    # ------------------------------------------------------------------------------------------- running
    @torch.no_grad()
    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Per-class sigmoids (B, classes) of a (B, 3, H, W) 0..1 batch."""
        net = self.load().net
        p = next(net.parameters())  # the host (e.g. ComfyUI's model manager) may have moved it
        x = preprocess(image.to(p.device)).to(p.dtype)
        return torch.sigmoid(net(x).float()).cpu()

    def decide(self, probs: torch.Tensor) -> list[str]:
        """RAM's decision: sigmoid above the class threshold, ``delete_tag_index`` removed, class order."""
        keep = probs > self.thresholds
        if self.delete_tag_index:
            keep[:, list(self.delete_tag_index)] = False
        return [", ".join(self.tags[i] for i in torch.nonzero(row).flatten().tolist()) for row in keep]

    def tag(self, image: torch.Tensor) -> list[str]:
        """Tags of each image of a (B, 3, H, W) 0..1 batch (or a PIL image / HxWxC uint8 array)."""
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != 3:
            from ..imageio import to_batch

            image = to_batch(image).rgb
        if self.osediff_resize:
            probs = torch.cat([self.probabilities(osediff_input(image[i:i + 1])) for i in range(image.shape[0])])
        else:
            probs = self.probabilities(image)
        out = self.decide(probs)
        if self._should_unload():
            self.unload()
        return out

    def __call__(self, image: torch.Tensor) -> str:
        tags = self.tag(image)[0]
        self.last_tags = tags
        return tags

    def _should_unload(self) -> bool:
        if self.unload_after is not None:
            return bool(self.unload_after)
        try:
            from ..memory import free_bytes

            return free_bytes(self.device) < 4 * self.size_bytes()
        except Exception:  # noqa: BLE001 - no reading of free memory: keep the tagger
            return False
