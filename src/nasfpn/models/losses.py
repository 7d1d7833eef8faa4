"""RetinaNet training loss: max-IoU assignment, sigmoid focal loss and L1 box loss.

Both losses are summed over anchors (and classes / coordinates) and divided by
``avg_factor = sum over images of max(num_positives, 1)``, computed on this device only.
Per-level sums are reported so a run can be compared with MMDetection level by level.
"""

from __future__ import annotations

import torch
from torchvision.ops import sigmoid_focal_loss

from nasfpn.models.boxes import IGNORE, MaxIoUAssigner, encode

_EPS = float(torch.finfo(torch.float32).eps)


def flatten_levels(maps: list[torch.Tensor], width: int) -> torch.Tensor:
    """Per-level ``(N, A*width, H, W)`` maps -> ``(N, sum H*W*A, width)`` in anchor order."""
    n = maps[0].shape[0]
    return torch.cat([m.permute(0, 2, 3, 1).reshape(n, -1, width) for m in maps], dim=1)


class RetinaLoss:
    def __init__(
        self,
        num_classes: int,
        assigner: MaxIoUAssigner,
        alpha: float = 0.25,
        gamma: float = 2.0,
        cls_weight: float = 1.0,
        box_weight: float = 1.0,
    ) -> None:
        self.num_classes = num_classes
        self.assigner = assigner
        self.alpha = alpha
        self.gamma = gamma
        self.cls_weight = cls_weight
        self.box_weight = box_weight

    @torch.no_grad()
    def targets(
        self,
        anchors: torch.Tensor,
        gt_boxes: list[torch.Tensor],
        gt_labels: list[torch.Tensor],
        valid: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image assignment -> (labels ``(N, A)`` with K for background and -1 for ignored,
        box targets ``(N, A, 4)`` float32, positive mask ``(N, A)``, avg_factor as a 0-d tensor)."""
        labels, box_targets, positives = [], [], []
        for i, (boxes, cls) in enumerate(zip(gt_boxes, gt_labels)):
            boxes = boxes.float()
            assigned = self.assigner(anchors, boxes, None if valid is None else valid[i])
            pos = assigned >= 0
            lab = torch.full_like(assigned, self.num_classes)
            lab = torch.where(assigned == IGNORE, -1, lab)
            tgt = torch.zeros_like(anchors)
            if boxes.shape[0] > 0:
                matched = assigned.clamp(min=0)
                lab = torch.where(pos, cls.long()[matched], lab)
                tgt = torch.where(pos[:, None], encode(anchors, boxes[matched]), tgt)
            labels.append(lab)
            box_targets.append(tgt)
            positives.append(pos)
        pos = torch.stack(positives)
        # Kept on the device: no host sync inside a training step.
        avg_factor = pos.sum(dim=1).clamp(min=1).sum().float()
        return torch.stack(labels), torch.stack(box_targets), pos, avg_factor

    def __call__(
        self,
        cls_maps: list[torch.Tensor],
        reg_maps: list[torch.Tensor],
        anchors: list[torch.Tensor],
        gt_boxes: list[torch.Tensor],
        gt_labels: list[torch.Tensor],
        valid: list[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Losses for one batch: ``loss_cls``, ``loss_bbox`` (totals), ``loss``, and per-level
        ``loss_cls_levels`` / ``loss_bbox_levels`` ``(L,)``; ``avg_factor`` and ``num_pos`` for logging."""
        counts = [a.shape[0] for a in anchors]
        flat_anchors = torch.cat(anchors)
        labels, box_targets, pos, avg_factor = self.targets(flat_anchors, gt_boxes, gt_labels, valid)
        cls = flatten_levels(cls_maps, self.num_classes)  # (N, A, K)
        reg = flatten_levels(reg_maps, 4)  # (N, A, 4)

        weight = (labels >= 0).to(cls.dtype)  # ignored / invalid anchors do not count
        # One-hot targets; background (K) and ignored (-1) anchors get an all-zero row.
        k = self.num_classes
        column = torch.where(labels < 0, k, labels)[..., None]
        onehot = cls.new_zeros(*cls.shape[:2], k + 1).scatter_(2, column, 1.0)[..., :k]
        focal = sigmoid_focal_loss(cls, onehot, alpha=self.alpha, gamma=self.gamma, reduction="none")
        cls_per_anchor = (focal * weight[..., None]).sum(dim=(0, 2))  # (A,)
        l1 = (reg - box_targets.to(reg.dtype)).abs() * pos[..., None].to(reg.dtype)
        box_per_anchor = l1.sum(dim=(0, 2))

        denom = avg_factor + _EPS
        cls_levels = torch.stack([s.sum() for s in cls_per_anchor.split(counts)]) / denom * self.cls_weight
        box_levels = torch.stack([s.sum() for s in box_per_anchor.split(counts)]) / denom * self.box_weight
        loss_cls, loss_bbox = cls_levels.sum(), box_levels.sum()
        return {
            "loss": loss_cls + loss_bbox,
            "loss_cls": loss_cls,
            "loss_bbox": loss_bbox,
            "loss_cls_levels": cls_levels,
            "loss_bbox_levels": box_levels,
            "avg_factor": avg_factor,
            "num_pos": pos.sum(),
        }
