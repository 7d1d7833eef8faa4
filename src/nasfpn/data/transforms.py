"""Pre-processing: test-time resize / normalise / pad, training augmentation, evaluation batches.

The training collate is ``data.collate.collate_train``.

Images travel as uint8 tensors ``(3, H, W)`` RGB until the batch is built; boxes are float32
``(M, 4)`` xyxy in pixels of the current image. The steps reproduce MMDetection's crop-640
pipelines:

- test: ``Resize(scale=(S, S), keep_ratio=True)`` -> ``(x - mean) / std`` -> zero pad (in the
  normalised space) to a multiple of ``pad_divisor``;
- train: ``RandomResize(scale=(S, S), ratio_range=(lo, hi), keep_ratio=True)`` ->
  ``RandomCrop(crop_size=(S, S))`` -> ``RandomFlip(0.5)`` -> normalise -> pad.

Resizing is bilinear with half-pixel centres and no antialiasing (cv2 ``INTER_LINEAR``), computed
in float32 and rounded half up to uint8. cv2 itself uses 11-bit fixed-point weights, so a resized
pixel can differ from MMDetection's by 1 grey level; unresized images (scale factor 1) are
bit-exact.

Training randomness comes from a ``torch.Generator`` made by ``make_generator(seed, epoch,
index)``, so every sample of a run can be reproduced on its own (exact resume, any worker count).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from nasfpn.core.structures import ImageMeta

Sample = dict[str, Any]
"""One dataset item: ``image`` uint8 ``(3, H, W)``, ``boxes`` float32 ``(M, 4)``, ``labels`` int64
``(M,)``, plus ``image_id``, ``file_name``, ``ori_shape``, ``img_shape``, ``scale_factor``."""


# --------------------------------------------------------------------------- randomness


def make_generator(seed: int, *parts: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, *parts)``, e.g. ``(seed, epoch, index)``.

    The tuple is mixed by numpy's ``SeedSequence`` so that neighbouring indices or epochs get
    unrelated streams.
    """
    state = np.random.SeedSequence([int(seed), *(int(p) for p in parts)]).generate_state(2, dtype=np.uint32)
    value = (int(state[0]) << 32 | int(state[1])) & ((1 << 63) - 1)
    return torch.Generator().manual_seed(value)


def _uniform(generator: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(generator: torch.Generator, high_inclusive: int) -> int:
    """Uniform integer in ``[0, high_inclusive]``."""
    return int(torch.randint(0, high_inclusive + 1, (), generator=generator))


# --------------------------------------------------------------------------- inputs


def to_uint8_chw(image: np.ndarray | torch.Tensor, index: int = 0) -> torch.Tensor:
    """A uint8 ``(3, H, W)`` tensor from an RGB uint8 ``(H, W, 3)`` array, a uint8 ``(3, H, W)``
    tensor, or a float ``(3, H, W)`` tensor in [0, 1] (scaled by 255 and rounded).

    Raises ``ValueError`` naming ``index`` for any other input.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image {index}: numpy images must be uint8, got {image.dtype}")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image {index}: numpy images must be (H, W, 3) RGB, got shape {image.shape}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"image {index}: empty image of shape {image.shape}")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image {index}: tensors must be (3, H, W) RGB, got shape {tuple(image.shape)}")
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(f"image {index}: empty image of shape {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            return image
        if image.is_floating_point():
            if image.numel() and (float(image.min()) < 0.0 or float(image.max()) > 1.0):
                raise ValueError(
                    f"image {index}: float tensors must hold values in [0, 1], "
                    f"got [{float(image.min()):.4g}, {float(image.max()):.4g}]"
                )
            return (image.float() * 255.0).round_().to(torch.uint8)
        raise ValueError(f"image {index}: tensor dtype must be uint8 or floating point, got {image.dtype}")
    raise ValueError(f"image {index}: expected a numpy array or torch tensor, got {type(image).__name__}")


# --------------------------------------------------------------------------- geometry


def rescale_size(height: int, width: int, scale: tuple[int, int] | int) -> tuple[int, int]:
    """``(new_h, new_w)`` of a keep-ratio resize to fit ``scale`` (mmcv ``rescale_size``).

    The factor is ``min(max(scale) / long_side, min(scale) / short_side)`` and each side becomes
    ``int(side * factor + 0.5)``, at least 1 (a sliver such as 1 x 2000 px would round to 0, where
    mmcv's resize fails).
    """
    if isinstance(scale, int):
        scale = (scale, scale)
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def resize_image(image: torch.Tensor, height: int, width: int, fast: bool = False) -> torch.Tensor:
    """Bilinear resize of a uint8 ``(3, H, W)`` image to ``(3, height, width)``, cv2-style.

    Half-pixel centres, no antialiasing; the image is returned as is when the size does not
    change (cv2 copies in that case too). The default computes in float32 and rounds half up
    (within one grey level of cv2's INTER_LINEAR on ~12% of pixels). ``fast`` uses PyTorch's
    uint8 kernel on a channels-last view instead: about 10x faster, within one grey level of
    cv2 on ~22% of pixels; training augmentation uses it, test-time pre-processing does not.
    """
    if tuple(image.shape[-2:]) == (height, width):
        return image
    if fast:
        hwc = image[None].contiguous(memory_format=torch.channels_last)
        return nnf.interpolate(hwc, size=(height, width), mode="bilinear", align_corners=False, antialias=False)[0]
    out = nnf.interpolate(
        image[None].float(), size=(height, width), mode="bilinear", align_corners=False, antialias=False
    )[0]
    return out.add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)


def round_up(value: int, divisor: int) -> int:
    return int(math.ceil(value / divisor) * divisor) if divisor > 1 else value


def _boxes(boxes: torch.Tensor, height: int, width: int) -> tv_tensors.BoundingBoxes:
    return tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width))


def resize_boxes(boxes: torch.Tensor, old_hw: tuple[int, int], new_hw: tuple[int, int]) -> torch.Tensor:
    """Scale xyxy boxes by ``(new_w / old_w, new_h / old_h)`` and clip them to the new image."""
    resized = F.resize(_boxes(boxes, *old_hw), list(new_hw), antialias=False)
    return F.clamp_bounding_boxes(resized).as_subclass(torch.Tensor)


# --------------------------------------------------------------------------- test time


def resize_for_test(image: torch.Tensor, size: int) -> tuple[torch.Tensor, ImageMeta]:
    """Keep-ratio resize of a uint8 ``(3, H, W)`` image to fit ``size x size``, and its meta."""
    h, w = image.shape[-2:]
    new_h, new_w = rescale_size(h, w, size)
    resized = resize_image(image, new_h, new_w)
    meta = ImageMeta(ori_shape=(h, w), img_shape=(new_h, new_w), scale_factor=(new_w / w, new_h / h))
    return resized, meta


def normalize_pad(
    images: Sequence[torch.Tensor],
    mean: Sequence[float],
    std: Sequence[float],
    pad_divisor: int = 1,
    pad_size: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Stack uint8 ``(3, h_i, w_i)`` images into a float32 ``(N, 3, H, W)`` batch.

    Each image becomes ``(x - mean) / std`` (RGB, 0..255 units) and is placed top-left; the rest
    is 0 in the normalised space. ``H, W`` is ``pad_size`` if given, else the largest height and
    width rounded up to ``pad_divisor``.
    """
    if not images:
        raise ValueError("cannot build a batch from zero images")
    max_h = max(int(im.shape[-2]) for im in images)
    max_w = max(int(im.shape[-1]) for im in images)
    if pad_size is not None:
        if max_h > pad_size[0] or max_w > pad_size[1]:
            raise ValueError(f"an image of {max_h}x{max_w} does not fit the pad size {pad_size[0]}x{pad_size[1]}")
        batch_h, batch_w = pad_size
    else:
        batch_h, batch_w = round_up(max_h, pad_divisor), round_up(max_w, pad_divisor)
    device = torch.device(device) if device is not None else images[0].device
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(3, 1, 1)
    batch = torch.zeros((len(images), 3, batch_h, batch_w), dtype=torch.float32, device=device)
    for i, im in enumerate(images):
        h, w = im.shape[-2:]
        # Same float32 ops in the same order as MMDetection's DetDataPreprocessor.
        batch[i, :, :h, :w] = (im.to(device).float() - mean_t) / std_t
    return batch


def preprocess_batch(
    images: Sequence[np.ndarray | torch.Tensor],
    size: int,
    pad_divisor: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, list[ImageMeta]]:
    """Test-time pre-processing of RGB images, as MMDetection's crop-640 test pipeline.

    ``images``: uint8 ``(H, W, 3)`` arrays, uint8 ``(3, H, W)`` tensors or float ``(3, H, W)``
    tensors in [0, 1]. Returns a float32 ``(N, 3, H, W)`` batch (on ``device``) and one
    ``ImageMeta`` per image; ``pad_shape`` is the image's own size rounded up to ``pad_divisor``.
    """
    if len(images) == 0:
        raise ValueError("preprocess_batch needs at least one image")
    resized: list[torch.Tensor] = []
    metas: list[ImageMeta] = []
    for i, image in enumerate(images):
        chw = to_uint8_chw(image, i)
        if device is not None:
            chw = chw.to(device)  # resize where the batch will live (GPU when given)
        im, meta = resize_for_test(chw, size)
        resized.append(im)
        h, w = meta.img_shape
        metas.append(
            ImageMeta(
                meta.ori_shape, meta.img_shape, meta.scale_factor, (round_up(h, pad_divisor), round_up(w, pad_divisor))
            )
        )
    return normalize_pad(resized, mean, std, pad_divisor, device=device), metas


class EvalTransform:
    """Dataset transform for evaluation: keep-ratio resize to fit ``size x size``."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        image, meta = resize_for_test(sample["image"], self.size)
        return {**sample, "image": image, "img_shape": meta.img_shape, "scale_factor": meta.scale_factor}


def collate_eval(
    samples: Sequence[Sample | None], mean: Sequence[float], std: Sequence[float], pad_divisor: int
) -> tuple[torch.Tensor, list[ImageMeta], list[dict[str, Any]]]:
    """Batch ``EvalTransform`` outputs: ``(images (N,3,H,W) float32, metas, infos)``.

    ``None`` samples (unreadable images under ``on_read_error="skip"``) are dropped; ``infos``
    holds ``image_id`` and ``file_name`` of the images kept. Equal to ``preprocess_batch`` on the
    same images.
    """
    kept = [s for s in samples if s is not None]
    if not kept:
        return torch.zeros((0, 3, 0, 0)), [], []
    metas = []
    for s in kept:
        h, w = s["img_shape"]
        metas.append(
            ImageMeta(
                tuple(s["ori_shape"]),
                (h, w),
                tuple(s["scale_factor"]),
                (round_up(h, pad_divisor), round_up(w, pad_divisor)),
            )
        )
    images = normalize_pad([s["image"] for s in kept], mean, std, pad_divisor)
    infos = [{"image_id": s["image_id"], "file_name": s["file_name"]} for s in kept]
    return images, metas, infos


# --------------------------------------------------------------------------- training


class TrainTransform:
    """Random resize -> random crop -> random horizontal flip (MMDetection's crop-640 recipe).

    - Resize: ``r ~ U(scale_range)``, target scale ``int(size * r)`` square, keep-ratio rescale
      (so the long side becomes about ``size * r``); boxes scaled and clipped to the image.
    - Crop: ``min(size, h) x min(size, w)`` at an offset uniform in ``[0, h - ch] x [0, w - cw]``;
      boxes shifted, clipped and dropped when their clipped width or height is <= 0. If the image
      had boxes and none survive, the offset is drawn again (MMDetection rejects such a crop and
      draws another sample); after ``max_crop_tries`` failures the crop is placed around a random
      box.
    - Flip with probability ``flip_prob``: ``x1' = W - x2``, ``x2' = W - x1``.
    """

    def __init__(
        self,
        size: int = 640,
        scale_range: tuple[float, float] = (0.8, 1.2),
        flip_prob: float = 0.5,
        max_crop_tries: int = 10,
    ) -> None:
        if scale_range[0] > scale_range[1] or scale_range[0] <= 0:
            raise ValueError(f"scale_range must be (lo, hi) with 0 < lo <= hi, got {scale_range}")
        if max_crop_tries < 1:
            raise ValueError(f"max_crop_tries must be >= 1, got {max_crop_tries}")
        self.size = size
        self.scale_range = scale_range
        self.flip_prob = flip_prob
        self.max_crop_tries = max_crop_tries

    def __call__(self, sample: Sample, generator: torch.Generator) -> Sample:
        image: torch.Tensor = sample["image"]
        boxes: torch.Tensor = sample["boxes"]
        labels: torch.Tensor = sample["labels"]
        h, w = image.shape[-2:]

        # Random resize.
        ratio = _uniform(generator, *self.scale_range)
        target = int(self.size * ratio)
        new_h, new_w = rescale_size(h, w, target)
        image = resize_image(image, new_h, new_w, fast=True)
        boxes = resize_boxes(boxes, (h, w), (new_h, new_w))

        # Random crop.
        crop_h, crop_w = min(self.size, new_h), min(self.size, new_w)
        top, left, boxes, keep = self._random_crop(boxes, new_h, new_w, crop_h, crop_w, generator)
        image = F.crop(image, top, left, crop_h, crop_w)
        boxes, labels = boxes[keep], labels[keep]

        # Random flip.
        flip = bool(torch.rand((), generator=generator) < self.flip_prob)
        if flip:
            image = F.horizontal_flip(image)
            boxes = F.horizontal_flip(_boxes(boxes, crop_h, crop_w)).as_subclass(torch.Tensor)

        return {
            **sample,
            "image": image,
            "boxes": boxes.contiguous(),
            "labels": labels,
            "img_shape": (crop_h, crop_w),
            "scale_factor": (new_w / w, new_h / h),
            "flip": flip,
            "crop_offset": (top, left),
        }

    def _random_crop(
        self, boxes: torch.Tensor, h: int, w: int, crop_h: int, crop_w: int, generator: torch.Generator
    ) -> tuple[int, int, torch.Tensor, torch.Tensor]:
        """``(top, left, cropped boxes, keep mask)`` of a crop that keeps a box if there was one."""
        margin_h, margin_w = h - crop_h, w - crop_w
        had_boxes = bool(_positive_size(boxes).any())
        for _ in range(self.max_crop_tries):
            top, left = _randint(generator, margin_h), _randint(generator, margin_w)
            cropped = _crop_boxes(boxes, h, w, top, left, crop_h, crop_w)
            keep = _positive_size(cropped)
            if keep.any() or not had_boxes:
                return top, left, cropped, keep
        # Fallback: a crop that contains (as much as possible of) one random box.
        idx = torch.nonzero(_positive_size(boxes)).flatten()
        x1, y1, x2, y2 = boxes[idx[_randint(generator, len(idx) - 1)]].tolist()
        top = _offset_around(y1, y2, crop_h, margin_h, generator)
        left = _offset_around(x1, x2, crop_w, margin_w, generator)
        cropped = _crop_boxes(boxes, h, w, top, left, crop_h, crop_w)
        return top, left, cropped, _positive_size(cropped)


def _crop_boxes(boxes: torch.Tensor, h: int, w: int, top: int, left: int, crop_h: int, crop_w: int) -> torch.Tensor:
    """Shift boxes into the crop window and clip them to it."""
    return F.crop(_boxes(boxes, h, w), top, left, crop_h, crop_w).as_subclass(torch.Tensor)


def _positive_size(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def _offset_around(lo: float, hi: float, crop: int, margin: int, generator: torch.Generator) -> int:
    """A crop offset in ``[0, margin]`` whose window ``[o, o + crop]`` holds ``[lo, hi]`` if it fits,
    else one centred on it."""
    first, last = max(0, math.ceil(hi - crop)), min(margin, math.floor(lo))
    if first <= last:
        return first + _randint(generator, last - first)
    return min(max(int((lo + hi - crop) / 2), 0), margin)


def normalize_batch(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    img_shapes: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """``(x - mean) / std`` of a uint8 ``(N, 3, H, W)`` batch, with padding set to 0 afterwards.

    ``img_shapes`` gives the ``(h, w)`` of real pixels in each image (top-left); everything else
    is padding and becomes exactly 0 in the normalised space. Meant for normalising on the GPU
    after moving a compact uint8 batch (``data.collate.collate_train(..., normalize=False)``).
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a uint8 (N, 3, H, W) batch, got {images.dtype} {tuple(images.shape)}")
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    out = (images.float() - mean_t) / std_t
    if img_shapes is not None:
        if len(img_shapes) != images.shape[0]:
            raise ValueError(f"{len(img_shapes)} image shapes for a batch of {images.shape[0]}")
        for i, (h, w) in enumerate(img_shapes):
            out[i, :, h:, :] = 0
            out[i, :, :, w:] = 0
    return out
