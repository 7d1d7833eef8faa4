"""The modules that are exported: the network, its anchors, and the end2end post-processing.

``NetworkGraph`` (torch-export), ``RawGraph`` (ONNX ``raw``) and ``EndToEndGraph`` (ONNX
``end2end``) implement the contracts of ``nasfpn.deploy.contract``. NMS is one custom op,
``nasfpn::multiclass_nms``, that runs ``torchvision`` NMS in PyTorch and becomes ONNX
``NonMaxSuppression`` in the file.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision
from torch import nn

from nasfpn.core.config import TestConfig
from nasfpn.models.anchors import level_anchors
from nasfpn.models.detector import RetinaNet
from nasfpn.models.postprocess import detection_candidates

# --------------------------------------------------------------------------- NMS as one ONNX op


@torch.library.custom_op("nasfpn::multiclass_nms", mutates_args=())
def multiclass_nms(
    boxes: torch.Tensor, scores: torch.Tensor, score_thr: torch.Tensor, max_per_class: int, iou_threshold: float
) -> torch.Tensor:
    """ONNX ``NonMaxSuppression`` (center_point_box=0) in PyTorch.

    ``boxes`` float ``(B, M, 4)`` xyxy, ``scores`` float ``(B, C, M)``. Per image and class, the
    boxes with score > ``score_thr`` go through greedy NMS (suppressed at IoU > ``iou_threshold``);
    at most ``max_per_class`` survive. Returns int64 ``(S, 3)`` rows ``(image, class, box index)``,
    by image, then class, then descending score.
    """
    out = []
    for b in range(scores.shape[0]):
        for c in range(scores.shape[1]):
            s = scores[b, c].float()
            idx = (s > score_thr).nonzero().squeeze(1)
            keep = idx[torchvision.ops.nms(boxes[b, idx].float(), s[idx], iou_threshold)[:max_per_class]]
            out.append(torch.stack([torch.full_like(keep, b), torch.full_like(keep, c), keep], dim=1))
    return torch.cat(out) if out else boxes.new_zeros((0, 3), dtype=torch.int64)


@multiclass_nms.register_fake
def _multiclass_nms_fake(boxes, scores, score_thr, max_per_class, iou_threshold):
    count = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((count, 3), dtype=torch.int64)


def multiclass_nms_onnx(boxes, scores, score_thr, max_per_class: int, iou_threshold: float):
    """The translation of ``nasfpn::multiclass_nms`` for the dynamo ONNX exporter."""
    from onnxscript import opset18 as op

    # The op stubs type Constant's output as any tensor type, NonMaxSuppression wants INT64 / FLOAT.
    return op.NonMaxSuppression(
        boxes,
        scores,
        op.Constant(value_ints=[max_per_class]),  # type: ignore[arg-type]
        op.Constant(value_floats=[iou_threshold]),  # type: ignore[arg-type]
        op.Reshape(score_thr, op.Constant(value_ints=[1])),  # type: ignore[arg-type]
        center_point_box=0,
    )


# --------------------------------------------------------------------------- graph post-processing


def postprocess_fixed(
    cls_maps: Sequence[torch.Tensor],
    reg_maps: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    image_info: torch.Tensor,
    score_thr: torch.Tensor,
    num_classes: int,
    cfg: TestConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``models.postprocess.postprocess`` with fixed-size outputs, for export.

    ``image_info`` float ``(B, 4)`` = (img_h, img_w, scale_x, scale_y); ``score_thr`` a 0-d float
    tensor. Returns ``boxes (B, K, 4)``, ``scores (B, K)``, ``labels (B, K)`` int64 and
    ``num_detections (B,)`` int64, K = ``min(max_per_img, candidates)``; rows past
    ``num_detections`` are 0 (labels -1).

    Everything before NMS is the eager code (``detection_candidates``: top-k, decode, clip,
    rescale, size filter). NMS and what follows differ: a graph has no per-image lists of
    varying length, so candidates stay in ``(B, M)`` tensors with a mask, NMS is one
    ``NonMaxSuppression`` op over a ``(B, C, M)`` score tensor (``multiclass_nms``), and the
    best K are taken with ``topk`` and padded instead of sliced.
    """
    if cfg.max_per_img <= 0:
        raise ValueError("export needs test.max_per_img > 0 (the outputs have a fixed size)")
    n = cls_maps[0].shape[0]
    inv = 1.0 / image_info[:, 2:4]  # (B, 2): 1/sx, 1/sy
    boxes, scores, labels, valid = detection_candidates(
        cls_maps, reg_maps, anchors, image_info[:, :2], torch.cat([inv, inv], dim=1), num_classes, score_thr, cfg
    )
    scores = torch.where(valid, scores, -1.0)

    # Class-aware NMS as NMS over classes: row c of (B, C, M) holds the scores of class-c boxes only.
    m = scores.shape[1]
    classes = torch.arange(num_classes, device=labels.device)
    per_class = torch.where(labels[:, None, :] == classes[None, :, None], scores[:, None, :], -1.0)
    # Each class keeps at most max_per_img: the image keeps only its max_per_img best anyway.
    selected = torch.ops.nasfpn.multiclass_nms(boxes, per_class, score_thr, cfg.max_per_img, cfg.nms_iou)
    flat = selected[:, 0] * m + selected[:, 2]
    kept = torch.zeros(n * m, dtype=torch.bool, device=scores.device).index_fill(0, flat, True).view(n, m)

    k = torch.sym_min(cfg.max_per_img, m)
    top, order = torch.where(kept, scores, -1.0).topk(k, dim=1)  # (B, K)
    num = kept.sum(dim=1).clamp(max=k)
    row_valid = torch.arange(k, device=num.device)[None, :] < num[:, None]
    out_boxes = torch.gather(boxes, 1, order[..., None].expand(-1, -1, 4))
    out_boxes = torch.where(row_valid[..., None], out_boxes, 0.0)
    out_scores = torch.where(row_valid, top, 0.0)
    out_labels = torch.where(row_valid, torch.gather(labels, 1, order), -1)
    return out_boxes, out_scores, out_labels, num


# --------------------------------------------------------------------------- exported modules


class NetworkGraph(nn.Module):
    """Backbone + neck + head: ``images (B, 3, H, W)`` -> ``(cls_p3..p7, reg_p3..p7)``."""

    def __init__(self, model: RetinaNet, half: bool = False) -> None:
        super().__init__()
        self.model = model
        self.fp16 = half  # not "half": that is nn.Module's method

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = images.half() if self.fp16 else images
        cls_maps, reg_maps = self.model(x)
        return tuple(m.float() for m in cls_maps) + tuple(m.float() for m in reg_maps)


class GraphAnchors(nn.Module):
    """The anchors of every level inside a graph: constants for a fixed input size
    (``input_hw``), or computed from the head maps' sizes (``input_hw=None``, dynamic size)."""

    def __init__(self, model: RetinaNet, input_hw: tuple[int, int] | None) -> None:
        super().__init__()
        gen = model.anchor_generator
        self.strides = gen.strides
        self.fixed = input_hw is not None
        device = next(model.parameters()).device
        tensors = _anchors(model, input_hw) if input_hw is not None else [b.to(device) for b in gen.base_anchors]
        for i, t in enumerate(tensors):
            self.register_buffer(f"t{i}", t.clone(), persistent=False)

    def forward(self, cls_maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        tensors = [getattr(self, f"t{i}") for i in range(len(self.strides))]
        if self.fixed:
            # "+ 0": an output must be computed, not an initializer.
            return [t + 0 for t in tensors]
        return [level_anchors(base, m.shape[-2], m.shape[-1], s) for base, m, s in zip(tensors, cls_maps, self.strides)]


class RawGraph(NetworkGraph):
    """``NetworkGraph`` plus the anchors of every level as outputs."""

    def __init__(self, model: RetinaNet, input_hw: tuple[int, int] | None, half: bool = False) -> None:
        super().__init__(model, half)
        self.anchors = GraphAnchors(model, input_hw)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps = super().forward(images)
        return maps + tuple(self.anchors(maps[: len(maps) // 2]))


class EndToEndGraph(nn.Module):
    """``(images, image_info, score_thr)`` -> ``(boxes, scores, labels, num_detections)``."""

    def __init__(
        self, model: RetinaNet, input_hw: tuple[int, int] | None, test_cfg: TestConfig, half: bool = False
    ) -> None:
        super().__init__()
        self.network = NetworkGraph(model, half)
        self.num_classes = model.num_classes
        self.test_cfg = test_cfg
        self.anchors = GraphAnchors(model, input_hw)

    def forward(self, images: torch.Tensor, image_info: torch.Tensor, score_thr: torch.Tensor):
        maps = self.network(images)
        levels = len(maps) // 2
        return postprocess_fixed(
            maps[:levels],
            maps[levels:],
            self.anchors(maps[:levels]),
            image_info,
            score_thr,
            self.num_classes,
            self.test_cfg,
        )


def _anchors(model: RetinaNet, input_hw: tuple[int, int]) -> list[torch.Tensor]:
    with torch.no_grad():
        device = next(model.parameters()).device
        probe = torch.zeros((1, 3, *input_hw), device=device, dtype=next(model.parameters()).dtype)
        outputs = model(probe)
    return [a.clone() for a in model.anchors(outputs)]
