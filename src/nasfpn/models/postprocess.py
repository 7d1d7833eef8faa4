"""Inference post-processing, equal to MMDetection 3.x for RetinaNet, batched over images and levels.

Per image and level: sigmoid scores, keep (anchor, class) pairs with score > ``score_thr``,
the top ``nms_pre`` of them, decode their boxes and clip to the resized image. Then over all
levels: rescale to original pixels, drop boxes of width or height <= ``min_bbox_size``,
class-aware NMS at ``nms_iou``, keep the ``max_per_img`` best.
"""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms

from ..config import TestConfig
from ..structures import ImageMeta
from .boxes import decode


def select_topk(cls_maps: list[torch.Tensor], reg_maps: list[torch.Tensor], anchors: list[torch.Tensor],
                num_classes: int, score_thr: float, nms_pre: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best ``nms_pre`` (anchor, class) pairs of every level and image, in one pass per level.

    Returns ``scores (N, M)``, ``labels (N, M)``, ``deltas (N, M, 4)``, ``anchors (N, M, 4)`` and a
    ``keep (N, M)`` mask of pairs above ``score_thr``; within a level, pairs are in descending score.
    """
    scores_all, labels_all, deltas_all, anchors_all = [], [], [], []
    n = cls_maps[0].shape[0]
    for cls, reg, anc in zip(cls_maps, reg_maps, anchors):
        scores = cls.permute(0, 2, 3, 1).reshape(n, -1).sigmoid()  # (N, HWA*K)
        deltas = reg.permute(0, 2, 3, 1).reshape(n, -1, 4)  # (N, HWA, 4)
        k = scores.shape[1] if nms_pre <= 0 else min(nms_pre, scores.shape[1])
        # Top-k of all pairs, then the threshold: the same set as threshold-then-top-k.
        top, idx = scores.topk(k, dim=1)
        anchor_idx = torch.div(idx, num_classes, rounding_mode="floor")
        scores_all.append(top)
        labels_all.append(idx % num_classes)
        deltas_all.append(torch.gather(deltas, 1, anchor_idx[..., None].expand(-1, -1, 4)))
        anchors_all.append(anc[anchor_idx])
    scores = torch.cat(scores_all, 1)
    return scores, torch.cat(labels_all, 1), torch.cat(deltas_all, 1), torch.cat(anchors_all, 1), scores > score_thr


def class_aware_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou: float) -> torch.Tensor:
    """Greedy NMS within each group (class, or image x class): indices kept, by descending score.

    A box is suppressed by a higher-scored one of its group with IoU > ``iou`` (area without +1).
    """
    return batched_nms(boxes, scores, groups, iou)


def postprocess(cls_maps: list[torch.Tensor], reg_maps: list[torch.Tensor], anchors: list[torch.Tensor],
                metas: list[ImageMeta], num_classes: int, cfg: TestConfig) -> list[dict[str, torch.Tensor]]:
    """Detections per image: ``boxes (D, 4)`` xyxy in original pixels, ``scores (D,)``, ``labels (D,)``."""
    n = cls_maps[0].shape[0]
    device = cls_maps[0].device
    scores, labels, deltas, anc, keep = select_topk(cls_maps, reg_maps, anchors, num_classes, cfg.score_thr, cfg.nms_pre)
    img_hw = torch.tensor([m.img_shape for m in metas], device=device, dtype=torch.float32)  # (N, 2)
    boxes = decode(anc, deltas.float(), img_hw[:, None, :], cfg.wh_ratio_clip)
    inv = torch.tensor([[1 / m.scale_factor[0], 1 / m.scale_factor[1]] * 2 for m in metas], device=device, dtype=torch.float32)
    boxes = boxes * inv[:, None, :]
    wh = boxes[..., 2:] - boxes[..., :2]
    keep &= (wh > cfg.min_bbox_size).all(dim=-1)

    image_idx = torch.arange(n, device=device)[:, None].expand_as(labels)
    boxes, scores, labels, image_idx = boxes[keep], scores[keep].float(), labels[keep], image_idx[keep]
    # One NMS call for the whole batch: boxes interact only within the same (image, class).
    kept = class_aware_nms(boxes, scores, image_idx * num_classes + labels, cfg.nms_iou)
    results = []
    for i in range(n):
        k = kept[image_idx[kept] == i][: cfg.max_per_img]
        results.append({"boxes": boxes[k], "scores": scores[k], "labels": labels[k]})
    return results
