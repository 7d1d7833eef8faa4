"""Per-image metadata that travels from pre-processing to post-processing."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageMeta:
    ori_shape: tuple[int, int]
    """(H, W) of the image as read from disk."""
    img_shape: tuple[int, int]
    """(H, W) after resizing, before padding: boxes are clipped to it."""
    scale_factor: tuple[float, float]
    """(sx, sy) = resized / original; boxes are divided by it to return to original pixels."""
    pad_shape: tuple[int, int] | None = None
    """(H, W) after padding this image (None: the batch tensor's size)."""
