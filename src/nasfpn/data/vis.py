"""Drawing detections on images (PIL only)."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def class_colour(label: int) -> tuple[int, int, int]:
    """A fixed, saturated colour per class: hues spaced by the golden ratio stay apart."""
    hue = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def one_box_per_object(boxes: np.ndarray, scores: np.ndarray, iou: float = 0.7) -> np.ndarray:
    """Indices of the boxes to draw: greedy, class-agnostic suppression of boxes that overlap a
    better-scored one by more than ``iou``. Detection keeps such pairs (NMS is per class, and COCO
    AP counts the second guess); a picture shows one box per object."""
    order = np.argsort(-scores, kind="stable")
    x0, y0, x1, y1 = boxes.T
    area = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    keep: list[int] = []
    for i in order:
        if keep:
            k = np.asarray(keep)
            w = np.clip(np.minimum(x1[k], x1[i]) - np.maximum(x0[k], x0[i]), 0, None)
            h = np.clip(np.minimum(y1[k], y1[i]) - np.maximum(y0[k], y0[i]), 0, None)
            inter = w * h
            if (inter > iou * (area[k] + area[i] - inter)).any():
                continue
        keep.append(int(i))
    return np.asarray(sorted(keep), dtype=np.int64)


def draw_detections(
    image: Image.Image | np.ndarray,
    boxes: Any,
    labels: Any,
    scores: Any | None = None,
    class_names: Sequence[str] | None = None,
    line_width: int = 2,
    overlap_iou: float | None = 0.7,
) -> Image.Image:
    """A copy of ``image`` with each box and a "name score" tag drawn on it.

    ``image``: PIL image or uint8 ``(H, W, 3)`` RGB array. ``boxes``: ``(N, 4)`` xyxy pixels;
    ``labels``: ``(N,)`` int; ``scores``: ``(N,)`` or None (tensors or arrays). A label
    outside ``class_names`` is shown as its number. With scores, a box that overlaps a
    better-scored one of any class by more than ``overlap_iou`` is not drawn
    (``one_box_per_object``; None draws every box).
    """
    if isinstance(image, np.ndarray):
        out = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).convert("RGB")
    else:
        out = image.convert("RGB")  # convert() copies, so the caller's image is untouched
    boxes_np = _as_numpy(boxes).reshape(-1, 4).astype(np.float64)
    labels_np = _as_numpy(labels).reshape(-1).astype(np.int64)
    scores_np = None if scores is None else _as_numpy(scores).reshape(-1).astype(np.float64)
    if len(labels_np) != len(boxes_np) or (scores_np is not None and len(scores_np) != len(boxes_np)):
        raise ValueError(
            f"{len(boxes_np)} boxes but {len(labels_np)} labels / "
            f"{'no' if scores_np is None else len(scores_np)} scores"
        )

    if scores_np is not None and overlap_iou is not None and len(boxes_np):
        shown = one_box_per_object(boxes_np, scores_np, overlap_iou)
        boxes_np, labels_np, scores_np = boxes_np[shown], labels_np[shown], scores_np[shown]

    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    # Lowest score first, so the most confident detections end up on top.
    order = np.argsort(scores_np, kind="stable") if scores_np is not None else np.arange(len(boxes_np))
    for i in order:
        x0, y0, x1, y1 = boxes_np[i].tolist()
        label = int(labels_np[i])
        colour = class_colour(label)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line_width)
        name = class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)
        text = name if scores_np is None else f"{name} {scores_np[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        # The tag sits above the box (inside its top edge at the image top), kept in the image.
        ty = y0 - th - 4 if y0 - th - 4 >= 0 else y0
        tx = max(0.0, min(x0, out.width - tw - 4))
        draw.rectangle((tx, ty, tx + tw + 4, ty + th + 4), fill=colour)
        draw.text((tx + 2 - left, ty + 2 - top), text, fill=(0, 0, 0), font=font)
    return out
