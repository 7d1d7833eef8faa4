"""Batches of equal padded input shape, so that a detection depends only on its own image.

A batch tensor is as large as its largest image, and every other image of the batch is padded
up to it. That padding is not neutral: the stride-128 level sees it in its receptive field and
NAS-FPN's global pooling cells average over it, so the same image gets other detections next to
a larger neighbour. Every place that batches several images at test time (``Detector.predict``,
dataset evaluation in one or several processes, the ONNX runtime, the server) therefore batches
only images that pre-process to the same padded shape, with the functions of this module:

- ``padded_input_shape``: the ``(H, W)`` an image of a given size is resized and padded to;
- ``group_by_shape``: index batches of equal shape, at most ``batch_size`` each;
- ``ShapeBatchSampler``: the same for a ``DataLoader`` over a dataset whose sizes are known;
- ``collate_eval_groups``: the guard behind the sampler, one batch per shape actually read.

Within a group the network still runs on several images at once, and a convolution may pick
another kernel for another batch size: results then differ in the last float bits (about 1e-6
of the head outputs), never in which padding an image sees.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import torch

from nasfpn.core.structures import ImageMeta
from nasfpn.data.transforms import Sample, collate_eval, rescale_size, round_up

Shape = tuple[int, int]


def padded_input_shape(height: int, width: int, image_size: int, pad_divisor: int, min_side: int = 0) -> Shape:
    """``(H, W)`` of the network input for an image of ``height x width``: keep-ratio resize to fit
    ``image_size x image_size``, each side rounded up to ``pad_divisor`` and to at least ``min_side``
    (the smallest input of a dynamic-size exported file)."""
    h, w = rescale_size(int(height), int(width), image_size)
    return max(round_up(h, pad_divisor), min_side), max(round_up(w, pad_divisor), min_side)


def group_by_shape(keys: Sequence[Hashable], batch_size: int) -> list[list[int]]:
    """Indices ``0..len(keys)-1`` in batches of at most ``batch_size`` with equal keys.

    A batch is emitted as soon as it is full, the remaining partial batches at the end in order
    of their first member; within a batch indices keep their order. Deterministic.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    open_batches: dict[Hashable, list[int]] = {}
    batches: list[list[int]] = []
    for i, key in enumerate(keys):
        members = open_batches.setdefault(key, [])
        members.append(i)
        if len(members) == batch_size:
            batches.append(members)
            del open_batches[key]
    batches.extend(open_batches.values())
    return batches


class ShapeBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batch sampler over a dataset whose image sizes are known (e.g. from the annotation file):
    each batch holds images of one padded input shape (``group_by_shape``)."""

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int, image_size: int, pad_divisor: int) -> None:
        keys = [padded_input_shape(h, w, image_size, pad_divisor) for h, w in sizes]
        self.batches = group_by_shape(keys, batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        return iter([list(b) for b in self.batches])

    def __len__(self) -> int:
        return len(self.batches)


def collate_eval_groups(
    samples: Sequence[Sample | None], mean: Sequence[float], std: Sequence[float], pad_divisor: int
) -> list[tuple[torch.Tensor, list[ImageMeta], list[dict[str, Any]]]]:
    """``collate_eval`` per padded shape of the samples as read: a list of ``(images, metas, infos)``.

    With ``ShapeBatchSampler`` this is one group; it is more only when an annotation file states
    another size than the image has (e.g. EXIF rotation), and then no image is padded for another.
    """
    kept = [s for s in samples if s is not None]
    keys = [(round_up(s["img_shape"][0], pad_divisor), round_up(s["img_shape"][1], pad_divisor)) for s in kept]
    return [
        collate_eval([kept[i] for i in members], mean, std, pad_divisor)
        for members in group_by_shape(keys, max(1, len(kept)))
    ]
