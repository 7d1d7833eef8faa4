"""Inference post-processing, equal to MMDetection 3.x for RetinaNet, batched over images and levels.

Per image and level: sigmoid scores, keep (anchor, class) pairs with score > ``score_thr``,
the top ``nms_pre`` of them, decode their boxes and clip to the resized image. Then over all
levels: rescale to original pixels, drop boxes of width or height <= ``min_bbox_size``,
class-aware NMS at ``nms_iou``, keep the ``max_per_img`` best.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import batched_nms

from nasfpn.core.config import TestConfig
from nasfpn.core.structures import ImageMeta
from nasfpn.models.boxes import decode


def _best_logit_per_anchor(cls: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(N, A*K, H, W)`` logits -> ``(N, H*W*A)`` best class logit per anchor, in anchor order.

    The reduction runs over the layout the map has (a reduction whose output order fights the
    input's strides is several times slower on CPU).
    """
    n, _, h, w = cls.shape
    if cls.is_contiguous(memory_format=torch.channels_last):
        return cls.permute(0, 2, 3, 1).unflatten(-1, (-1, num_classes)).amax(dim=-1).reshape(n, -1)  # (N, H, W, A)
    return cls.reshape(n, -1, num_classes, h * w).amax(dim=2).transpose(1, 2).reshape(n, -1)  # (N, A, HW) -> (N, HW*A)


def select_topk(
    cls_maps: Sequence[torch.Tensor],
    reg_maps: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    num_classes: int,
    score_thr: float | torch.Tensor,
    nms_pre: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best ``nms_pre`` (anchor, class) pairs of every level and image, in one pass per level.

    Returns ``scores (N, M)``, ``labels (N, M)``, ``deltas (N, M, 4)``, ``anchors (N, M, 4)`` and a
    ``keep (N, M)`` mask of pairs above ``score_thr``; within a level, pairs are in descending score.

    Pairs are ranked by logit (sigmoid is monotonic, so the order is the same) and only the k
    selected logits go through the sigmoid. The k best pairs lie within the k anchors of highest
    best-class logit (an anchor holding one of them has a best logit at least that high, and fewer
    than k anchors can), so the per-anchor maxima are ranked first and then the k x K pairs of
    those anchors. Maps are read in place, NCHW or channels-last: no transposed copy of the
    ``(N, A*K, H, W)`` class map is made. Exported graphs run this too (``score_thr`` then a 0-d
    tensor, map sizes symbolic).
    """
    scores_all, labels_all, deltas_all, anchors_all = [], [], [], []
    n = cls_maps[0].shape[0]
    batch = torch.arange(n, device=cls_maps[0].device)[:, None]
    for cls, reg, anc in zip(cls_maps, reg_maps, anchors):
        h, w = cls.shape[-2:]
        num_a = cls.shape[1] // num_classes  # anchors per cell
        logits = cls.reshape(n, num_a, num_classes, h * w)  # (N, A, K, HW): a view for NCHW and channels-last
        deltas = reg.reshape(n, num_a, 4, h * w)  # (N, A, 4, HW)
        best = _best_logit_per_anchor(cls, num_classes)  # (N, HW*A), flat anchor index hw * A + a
        num_pairs = best.shape[1] * num_classes
        # sym_min is min for ints; in a graph exported for any input size the lengths are symbolic.
        k = num_pairs if nms_pre <= 0 else torch.sym_min(nms_pre, num_pairs)
        cand = best.topk(torch.sym_min(k, best.shape[1]), dim=1).indices  # (N, C) anchors
        pair_logits = logits[batch, cand % num_a, :, torch.div(cand, num_a, rounding_mode="floor")]  # (N, C, K)
        # Top-k of all pairs, then the threshold: the same set as threshold-then-top-k.
        top, idx = pair_logits.reshape(n, -1).topk(k, dim=1)
        anchor_idx = torch.gather(cand, 1, torch.div(idx, num_classes, rounding_mode="floor"))  # (N, k)
        cell, a = torch.div(anchor_idx, num_a, rounding_mode="floor"), anchor_idx % num_a
        scores_all.append(top.sigmoid())
        labels_all.append(idx % num_classes)
        deltas_all.append(deltas[batch, a, :, cell])  # (N, k, 4)
        anchors_all.append(anc[anchor_idx])
    scores = torch.cat(scores_all, 1)
    return scores, torch.cat(labels_all, 1), torch.cat(deltas_all, 1), torch.cat(anchors_all, 1), scores > score_thr


def detection_candidates(
    cls_maps: Sequence[torch.Tensor],
    reg_maps: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    img_hw: torch.Tensor,
    inv_scale: torch.Tensor,
    num_classes: int,
    score_thr: float | torch.Tensor,
    cfg: TestConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Everything before NMS, shared by ``postprocess`` and the exported graphs.

    ``img_hw (N, 2)``: the resized image size (boxes are clipped to it); ``inv_scale (N, 4)``:
    ``(1/sx, 1/sy, 1/sx, 1/sy)``. Returns ``boxes (N, M, 4)`` in original pixels, ``scores``,
    ``labels`` and a ``keep (N, M)`` mask: above ``score_thr`` and wider and taller than
    ``min_bbox_size``.
    """
    scores, labels, deltas, anc, keep = select_topk(cls_maps, reg_maps, anchors, num_classes, score_thr, cfg.nms_pre)
    boxes = decode(anc, deltas.float(), img_hw[:, None, :], cfg.wh_ratio_clip)
    boxes = boxes * inv_scale[:, None, :]
    wh = boxes[..., 2:] - boxes[..., :2]
    return boxes, scores, labels, keep & (wh > cfg.min_bbox_size).all(dim=-1)


def class_aware_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou: float) -> torch.Tensor:
    """Greedy NMS within each group (class, or image x class): indices kept, by descending score.

    A box is suppressed by a higher-scored one of its group with IoU > ``iou`` (area without +1).
    """
    return batched_nms(boxes, scores, groups, iou)


def postprocess(
    cls_maps: list[torch.Tensor],
    reg_maps: list[torch.Tensor],
    anchors: list[torch.Tensor],
    metas: list[ImageMeta],
    num_classes: int,
    cfg: TestConfig,
) -> list[dict[str, torch.Tensor]]:
    """Detections per image: ``boxes (D, 4)`` xyxy in original pixels, ``scores (D,)``, ``labels (D,)``."""
    n = cls_maps[0].shape[0]
    device = cls_maps[0].device
    img_hw = torch.tensor([m.img_shape for m in metas], device=device, dtype=torch.float32)  # (N, 2)
    inv = torch.tensor(
        [[1 / m.scale_factor[0], 1 / m.scale_factor[1]] * 2 for m in metas], device=device, dtype=torch.float32
    )
    boxes, scores, labels, keep = detection_candidates(
        cls_maps, reg_maps, anchors, img_hw, inv, num_classes, cfg.score_thr, cfg
    )

    image_idx = torch.arange(n, device=device)[:, None].expand_as(labels)
    boxes, scores, labels, image_idx = boxes[keep], scores[keep].float(), labels[keep], image_idx[keep]
    # One NMS call for the whole batch: boxes interact only within the same (image, class).
    kept = class_aware_nms(boxes, scores, image_idx * num_classes + labels, cfg.nms_iou)
    results = []
    for i in range(n):
        k = kept[image_idx[kept] == i][: cfg.max_per_img]
        results.append({"boxes": boxes[k], "scores": scores[k], "labels": labels[k]})
    return results
