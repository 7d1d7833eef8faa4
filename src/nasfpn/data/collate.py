"""The training collate: ``TrainTransform`` outputs -> ``(images, targets)`` batches.

Unreadable images, one policy for all of training: the dataset (``CocoDataset``, see
``data/coco.py``) gives ``None`` for an image it cannot read; this collate drops those samples and
logs how many it dropped; a batch without any readable image becomes ``None``, which the training
loop skips (the step counter still advances, so the data order of later steps is unchanged).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from nasfpn.core.config import DataConfig
from nasfpn.data.transforms import Sample, normalize_pad, round_up

logger = logging.getLogger(__name__)

TrainBatch = tuple[torch.Tensor, list[dict[str, Any]]]


def collate_train(
    samples: Sequence[Sample | None],
    mean: Sequence[float],
    std: Sequence[float],
    pad_size: int | None = None,
    pad_divisor: int = 1,
    normalize: bool = True,
) -> TrainBatch | None:
    """Batch ``TrainTransform`` outputs into ``(images, targets)``, or None without a readable sample.

    ``images`` is float32 ``(N, 3, H, W)`` normalised with 0 padding, or, with
    ``normalize=False``, uint8 with 0 padding to be passed through ``normalize_batch`` later
    (on the device). ``H = W = pad_size`` if given, else the largest size rounded up to
    ``pad_divisor``. Each target holds ``boxes`` float32 ``(M, 4)``, ``labels`` int64 ``(M,)``,
    ``img_shape`` (real pixels) and ``pad_shape`` (``(pad_size, pad_size)``, or the image size
    rounded up to ``pad_divisor``, as MMDetection uses for anchor valid flags), plus
    ``image_id``. ``None`` samples (unreadable images) are dropped and counted in a warning.
    """
    kept = [s for s in samples if s is not None]
    dropped = len(samples) - len(kept)
    if dropped:
        logger.warning("dropped %d unreadable image(s) from a training batch of %d", dropped, len(samples))
    if not kept:
        return None
    fixed = (pad_size, pad_size) if pad_size is not None else None
    targets = []
    for s in kept:
        h, w = s["image"].shape[-2:]
        targets.append(
            {
                "boxes": s["boxes"].float(),
                "labels": s["labels"].long(),
                "img_shape": (h, w),
                "pad_shape": fixed or (round_up(h, pad_divisor), round_up(w, pad_divisor)),
                "image_id": s["image_id"],
            }
        )
    if normalize:
        return normalize_pad([s["image"] for s in kept], mean, std, pad_divisor, fixed), targets
    max_h = max(t["img_shape"][0] for t in targets)
    max_w = max(t["img_shape"][1] for t in targets)
    batch_h, batch_w = fixed or (round_up(max_h, pad_divisor), round_up(max_w, pad_divisor))
    if max_h > batch_h or max_w > batch_w:
        raise ValueError(f"an image of {max_h}x{max_w} does not fit the pad size {batch_h}x{batch_w}")
    batch = torch.zeros((len(kept), 3, batch_h, batch_w), dtype=torch.uint8)
    for i, s in enumerate(kept):
        h, w = s["image"].shape[-2:]
        batch[i, :, :h, :w] = s["image"]
    return batch, targets


def train_collate(d: DataConfig) -> Callable[[Sequence[Sample | None]], TrainBatch | None]:
    """The ``collate_fn`` of training batches under data config ``d`` (picklable, for loader workers)."""
    return functools.partial(
        collate_train,
        mean=d.mean,
        std=d.std,
        pad_size=d.train_crop if d.train_pad_to_size else None,
        pad_divisor=d.pad_divisor,
    )


def loader_settings(device: torch.device | str, workers: int) -> dict[str, Any]:
    """DataLoader keyword arguments for a fast input pipeline: pinned host memory when the batch
    goes to CUDA (``tensor.to(device, non_blocking=True)`` then overlaps the copy), workers kept
    alive across epochs, two batches prefetched per worker."""
    settings: dict[str, Any] = {"num_workers": workers, "pin_memory": torch.device(device).type == "cuda"}
    if workers > 0:
        settings.update(persistent_workers=True, prefetch_factor=2)
    return settings
