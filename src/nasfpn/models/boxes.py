"""Pure box functions: IoU, delta coding, max-IoU assignment. Boxes are float xyxy pixels."""

from __future__ import annotations

import math

import torch

# Assignment sentinels (non-negative values are ground-truth indices).
BACKGROUND = -1
IGNORE = -2


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """IoU matrix ``(N, M)``; area is ``(x2-x1)*(y2-y1)`` (no +1), the union is clamped at ``eps``."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = (area1[:, None] + area2[None, :] - inter).clamp(min=eps)
    return inter / union


def encode(anchors: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Deltas ``(dx, dy, dw, dh)`` that move ``anchors`` onto ``gt`` (both ``(N, 4)``)."""
    px = (anchors[:, 0] + anchors[:, 2]) * 0.5
    py = (anchors[:, 1] + anchors[:, 3]) * 0.5
    pw = anchors[:, 2] - anchors[:, 0]
    ph = anchors[:, 3] - anchors[:, 1]
    gx = (gt[:, 0] + gt[:, 2]) * 0.5
    gy = (gt[:, 1] + gt[:, 3]) * 0.5
    gw = gt[:, 2] - gt[:, 0]
    gh = gt[:, 3] - gt[:, 1]
    return torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)


def decode(
    anchors: torch.Tensor,
    deltas: torch.Tensor,
    max_shape: tuple[int, int] | torch.Tensor | None = None,
    wh_ratio_clip: float = 16 / 1000,
) -> torch.Tensor:
    """Boxes from ``deltas`` applied to ``anchors`` (``(..., 4)``), dw/dh clamped to |log(wh_ratio_clip)|.

    ``max_shape`` (H, W) clips the result to the image; a tensor ``(..., 2)`` clips per row.
    """
    max_ratio = abs(math.log(wh_ratio_clip))
    pxy = (anchors[..., :2] + anchors[..., 2:]) * 0.5
    pwh = anchors[..., 2:] - anchors[..., :2]
    gxy = pxy + pwh * deltas[..., :2]
    gwh = pwh * deltas[..., 2:].clamp(min=-max_ratio, max=max_ratio).exp()
    boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
    if max_shape is not None:
        if isinstance(max_shape, torch.Tensor):
            hw = max_shape.to(boxes.dtype)
            upper = torch.stack([hw[..., 1], hw[..., 0], hw[..., 1], hw[..., 0]], dim=-1)
            boxes = torch.minimum(boxes.clamp(min=0), upper)
        else:
            h, w = max_shape
            boxes = torch.stack(
                [
                    boxes[..., 0].clamp(0, w),
                    boxes[..., 1].clamp(0, h),
                    boxes[..., 2].clamp(0, w),
                    boxes[..., 3].clamp(0, h),
                ],
                dim=-1,
            )
    return boxes


class MaxIoUAssigner:
    """Each anchor gets the gt it overlaps most (IoU >= pos_iou_thr), background below neg_iou_thr,
    ignored in between; then every gt claims all anchors that reach its own max IoU
    (``match_low_quality``, ties included) if that max is >= ``min_pos_iou``.
    """

    def __init__(
        self,
        pos_iou_thr: float = 0.5,
        neg_iou_thr: float = 0.5,
        min_pos_iou: float = 0.0,
        match_low_quality: bool = True,
    ) -> None:
        self.pos_iou_thr = pos_iou_thr
        self.neg_iou_thr = neg_iou_thr
        self.min_pos_iou = min_pos_iou
        self.match_low_quality = match_low_quality

    def __call__(
        self, anchors: torch.Tensor, gt_boxes: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """int64 ``(num_anchors,)``: gt index, ``BACKGROUND`` or ``IGNORE`` (also for invalid anchors).

        Written without data-dependent indexing, so a training step needs no host-device sync.
        """
        num = anchors.shape[0]
        ignore = torch.full((num,), IGNORE, dtype=torch.int64, device=anchors.device)
        if gt_boxes.shape[0] == 0:
            return ignore.fill_(BACKGROUND) if valid is None else torch.where(valid, BACKGROUND, ignore)
        ious = box_iou(gt_boxes, anchors)  # (G, A)
        if valid is not None:
            # An invalid anchor has IoU -1: never background, never a match, never a gt's best.
            ious = ious.masked_fill(~valid[None, :], -1.0)
        max_iou, argmax = ious.max(dim=0)
        assigned = torch.where((max_iou >= 0) & (max_iou < self.neg_iou_thr), BACKGROUND, ignore)
        assigned = torch.where(max_iou >= self.pos_iou_thr, argmax, assigned)
        if self.match_low_quality:
            gt_max = ious.max(dim=1, keepdim=True).values  # (G, 1)
            claims = (ious == gt_max) & (gt_max >= self.min_pos_iou)
            # Gts claim in order, so where several claim one anchor the last one wins.
            gt_index = torch.arange(gt_boxes.shape[0], device=anchors.device)[:, None]
            last = torch.where(claims, gt_index, -1).amax(dim=0)
            assigned = torch.where(last >= 0, last, assigned)
        return assigned
