"""What ``predict`` of every runtime accepts: one image, or a list (or tuple) of images.

An image is a file path (``str`` or ``Path``, decoded by ``data.io.read_image``), a PIL image (EXIF
orientation applied and converted to RGB as a file is), an RGB uint8 ``(H, W, 3)`` numpy array,
or an RGB tensor, ``(3, H, W)`` or ``(H, W, 3)``, uint8 or float in [0, 1]. One image gives one
result dict, a list gives a list in the same order. ``data.transforms.to_uint8_chw`` then turns
each into the uint8 ``(3, H, W)`` tensor the pre-processing starts from, so the pixels, and the
detections, are the same whichever form an image came in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from nasfpn.data.io import read_image, to_rgb

ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor
"""One image as ``predict`` takes it."""
ImageList = list[Any] | tuple[Any, ...]
"""Several images (each an ``ImageInput``): ``predict`` returns a list."""


def _one_image(image: object, index: int) -> np.ndarray | torch.Tensor:
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):
        try:
            return to_rgb(ImageOps.exif_transpose(image))
        except OSError as e:  # a lazily opened file that turns out truncated or corrupt
            raise ValueError(f"image {index}: the PIL image cannot be decoded ({e})") from None
    if isinstance(image, np.ndarray):
        if image.ndim == 4:
            raise ValueError(f"image {index}: a 4-D array {image.shape} is a batch; pass a list of images")
        # np.asarray(PIL image) is read-only, and torch cannot share read-only memory: copy it.
        return image if image.flags.writeable else image.copy()
    if isinstance(image, torch.Tensor):
        if image.dim() == 4:
            raise ValueError(f"image {index}: a 4-D tensor {tuple(image.shape)} is a batch; pass a list of images")
        if image.dim() == 3 and image.shape[0] != 3 and image.shape[2] == 3:
            return image.permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)
        return image
    raise ValueError(
        f"image {index}: expected a file path, a PIL image, a numpy array or a torch tensor, got {type(image).__name__}"
    )


def image_batch(images: object) -> tuple[list[np.ndarray | torch.Tensor], bool]:
    """``(arrays or tensors for to_uint8_chw, single)``: ``single`` when ``images`` is one image
    rather than a list or tuple of them. Raises ``ValueError`` naming the image's index."""
    if isinstance(images, (list, tuple)):
        return [_one_image(image, i) for i, image in enumerate(images)], False
    return [_one_image(images, 0)], True
