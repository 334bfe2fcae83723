"""Comparison pictures: one row per image, one tile per method (LQ / bicubic / methods... / GT).

Every tile is the full image scaled to ``tile_width`` (LQ is shown nearest-neighbour enlarged so its pixels are
visible), with a zoomed inset of the face in its lower-right corner and the method name plus metric values
printed under it. The picture size is deterministic: see :func:`grid_size`.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

PAD = 8
TEXT_LINE = 14
TEXT_LINES = 3  # name + two lines of metrics
INSET_FRACTION = 0.45  # inset side as a fraction of the tile width
BG = (255, 255, 255)
FG = (20, 20, 20)


def grid_size(n_cols: int, n_rows: int, tile_w: int, tile_h: int, title: bool = False) -> tuple[int, int]:
    """(width, height) of the PNG that :func:`make_grid` writes."""
    cell_h = tile_h + TEXT_LINE * TEXT_LINES + PAD
    return n_cols * (tile_w + PAD) + PAD, n_rows * cell_h + PAD + (TEXT_LINE + PAD if title else 0)


def _pil(img):
    from PIL import Image

    from ..imageio import to_uint8_rgb

    if isinstance(img, Image.Image):
        return img.convert("RGB")
    return Image.fromarray(to_uint8_rgb(img))


def _fmt(metrics: Mapping[str, Any] | None) -> list[str]:
    if not metrics:
        return []
    parts = []
    for k, v in metrics.items():
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        parts.append(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}")
    lines, cur = [], ""
    for p in parts:
        if cur and len(cur) + len(p) + 2 > 44:
            lines.append(cur)
            cur = p
        else:
            cur = f"{cur}  {p}" if cur else p
    if cur:
        lines.append(cur)
    return lines[: TEXT_LINES - 1]


def make_tile(img, tile_w: int, tile_h: int, face_box=None, nearest: bool = False):
    """The image letterboxed into tile_w x tile_h, with a zoomed inset of ``face_box`` (xyxy, image px)."""
    from PIL import Image, ImageDraw

    im = _pil(img)
    k = min(tile_w / im.width, tile_h / im.height)
    size = (max(1, round(im.width * k)), max(1, round(im.height * k)))
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.LANCZOS
    tile = Image.new("RGB", (tile_w, tile_h), BG)
    tile.paste(im.resize(size, resample), ((tile_w - size[0]) // 2, (tile_h - size[1]) // 2))
    if face_box is not None:
        x1, y1, x2, y2 = [float(v) for v in face_box]
        side = min(max(x2 - x1, y2 - y1) * 1.2, im.width, im.height)
        # keep the inset's square inside the image (no black borders)
        cx = min(max((x1 + x2) / 2, side / 2), im.width - side / 2)
        cy = min(max((y1 + y2) / 2, side / 2), im.height - side / 2)
        box = tuple(int(round(v)) for v in (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
        inset_side = max(16, int(min(tile_w, tile_h) * INSET_FRACTION))
        inset = im.crop(box).resize((inset_side, inset_side), resample)
        ox, oy = tile_w - inset_side - 2, tile_h - inset_side - 2
        tile.paste(inset, (ox, oy))
        draw = ImageDraw.Draw(tile)
        draw.rectangle([ox - 1, oy - 1, ox + inset_side, oy + inset_side], outline=(255, 200, 0), width=2)
        # mark where the inset comes from
        bx0 = (tile_w - size[0]) // 2 + box[0] * k
        by0 = (tile_h - size[1]) // 2 + box[1] * k
        draw.rectangle([bx0, by0, bx0 + side * k, by0 + side * k], outline=(255, 200, 0), width=1)
    return tile


def make_grid(rows: Sequence[Sequence[tuple[str, Any]]], out_path: str | os.PathLike, *,
              metrics: Sequence[Mapping[str, Mapping[str, Any]]] | None = None,
              face_boxes: Sequence[Any] | None = None, tile_width: int = 320, title: str | None = None,
              nearest_labels: Sequence[str] = ("LQ",)) -> tuple[int, int]:
    """Write the comparison PNG. ``rows[r]`` is a list of ``(label, image)``; ``metrics[r][label]`` is a dict
    of values printed under that tile; ``face_boxes[r]`` is the inset box in the *largest* image's pixels
    (scaled for smaller tiles such as the LQ). Returns the PNG's (width, height).
    """
    from PIL import Image, ImageDraw

    if not rows or not rows[0]:
        raise ValueError("Nothing to compare: no images were given.")
    n_cols = max(len(r) for r in rows)
    first = _pil(max(rows[0], key=lambda kv: _pil(kv[1]).width)[1])
    tile_h = max(16, round(tile_width * first.height / first.width))
    width, height = grid_size(n_cols, len(rows), tile_width, tile_h, bool(title))
    extra = TEXT_LINE + PAD if title else 0
    canvas = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((PAD, PAD // 2), title, fill=FG)
    cell_h = tile_h + TEXT_LINE * TEXT_LINES + PAD
    for r, row in enumerate(rows):
        ref_w = max(_pil(img).width for _, img in row)
        for c, (label, img) in enumerate(row):
            im = _pil(img)
            box = None
            if face_boxes is not None and face_boxes[r] is not None:
                box = np.asarray(face_boxes[r], np.float64) * (im.width / ref_w)
            tile = make_tile(im, tile_width, tile_h, box, nearest=label in nearest_labels)
            x, y = PAD + c * (tile_width + PAD), extra + PAD + r * cell_h
            canvas.paste(tile, (x, y))
            lines = [label] + _fmt((metrics[r] if metrics else {}).get(label))
            for li, text in enumerate(lines):
                draw.text((x, y + tile_h + 2 + li * TEXT_LINE), text, fill=FG)
    out_path = os.fspath(out_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    canvas.save(out_path, format="PNG", optimize=True)
    return canvas.size
