"""RetinaNet = backbone + neck + head, with anchors, loss and post-processing as separate steps.

Contract:

- ``forward(images)``: ``images`` float ``(N, 3, H, W)``, normalised and padded by ``nasfpn.data``.
  Returns ``(cls_maps, reg_maps)``: per level ``(N, A*K, H_l, W_l)`` logits and
  ``(N, A*4, H_l, W_l)`` box deltas. Tensors in, tensors out: this is the exportable core.
- ``loss(outputs, targets)``: ``targets`` one dict per image with ``boxes`` float ``(M, 4)``
  xyxy in input pixels and ``labels`` int64 ``(M,)``; optional ``pad_shape`` (H, W).
- ``postprocess(outputs, metas)``: one dict per image with ``boxes`` (xyxy, original pixels),
  ``scores`` and ``labels``.
"""

from __future__ import annotations

import torch
from torch import nn

from nasfpn.core.config import ModelConfig, TestConfig
from nasfpn.core.structures import ImageMeta
from nasfpn.models.anchors import AnchorGenerator
from nasfpn.models.backbone import Backbone, build_backbone
from nasfpn.models.boxes import MaxIoUAssigner
from nasfpn.models.fpn import FPN
from nasfpn.models.head import RetinaHead
from nasfpn.models.losses import RetinaLoss
from nasfpn.models.nasfpn import NASFPN, parse_genotype
from nasfpn.models.postprocess import postprocess

Outputs = tuple[list[torch.Tensor], list[torch.Tensor]]


class RetinaNet(nn.Module):
    def __init__(
        self,
        backbone: Backbone,
        neck: nn.Module,
        head: RetinaHead,
        anchor_generator: AnchorGenerator,
        loss: RetinaLoss,
        test_cfg: TestConfig,
        deep_supervision: bool = False,
        exit_stack: int = 0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.anchor_generator = anchor_generator
        self.criterion = loss
        self.test_cfg = test_cfg
        self.num_classes = head.num_classes
        self.deep_supervision = deep_supervision and isinstance(neck, NASFPN)
        if exit_stack and not (isinstance(neck, NASFPN) and 0 < exit_stack <= len(neck.fpn_stages)):
            stacks = len(neck.fpn_stages) if isinstance(neck, NASFPN) else 0
            raise ValueError(
                f"exit_stack={exit_stack}: a NAS-FPN with {stacks} stacks exits after 1..{stacks} (0: all)"
                if stacks
                else f"exit_stack={exit_stack} needs a NAS-FPN neck"
            )
        self.exit_stack = exit_stack
        """Anytime detection: ``forward`` stops after this many stacks unless told otherwise (0: all)."""

    @property
    def num_stacks(self) -> int:
        return len(self.neck.fpn_stages) if isinstance(self.neck, NASFPN) else 1

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a float tensor (N, 3, H, W), got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point (normalised), got {images.dtype}")

    def forward(self, images: torch.Tensor, stacks: int | None = None) -> Outputs:
        """Head outputs; ``stacks`` exits a NAS-FPN after that many stacks (anytime detection;
        default ``exit_stack``, i.e. all stacks unless the config sets ``model.neck.exit_stack``)."""
        self._check_images(images)
        feats = self.backbone(images)
        stacks = stacks or self.exit_stack or None
        pyramid = self.neck(feats, stacks) if isinstance(self.neck, NASFPN) else self.neck(feats)
        return self.head(pyramid)

    def forward_stacks(self, images: torch.Tensor) -> list[Outputs]:
        """Head outputs after every NAS-FPN stack (deep supervision)."""
        self._check_images(images)
        feats = self.backbone(images)
        if not isinstance(self.neck, NASFPN):
            return [self.head(self.neck(feats))]
        return [self.head(p) for p in self.neck.forward_stacks(feats)]

    def anchors(self, outputs: Outputs) -> list[torch.Tensor]:
        sizes = [(m.shape[-2], m.shape[-1]) for m in outputs[0]]
        return self.anchor_generator.grid_anchors(sizes, outputs[0][0].device)

    def loss(self, outputs: Outputs, targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        cls_maps, reg_maps = outputs
        if len(targets) != cls_maps[0].shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {cls_maps[0].shape[0]} images")
        for i, t in enumerate(targets):
            boxes = t["boxes"]
            if boxes.dim() != 2 or boxes.shape[-1] != 4:
                raise ValueError(f"image {i}: boxes must be (M, 4), got {tuple(boxes.shape)}")
            if t["labels"].shape[0] != boxes.shape[0]:
                raise ValueError(f"image {i}: {boxes.shape[0]} boxes but {t['labels'].shape[0]} labels")
        anchors = self.anchors(outputs)
        valid = None
        if any(t.get("pad_shape") is not None for t in targets):
            sizes = [(m.shape[-2], m.shape[-1]) for m in cls_maps]
            unbounded = (1 << 30, 1 << 30)  # no pad_shape: the whole batch tensor is this image
            valid = [
                self.anchor_generator.valid_flags(sizes, tuple(t.get("pad_shape") or unbounded), cls_maps[0].device)
                for t in targets
            ]
        return self.criterion(
            cls_maps, reg_maps, anchors, [t["boxes"] for t in targets], [t["labels"] for t in targets], valid
        )

    @torch.no_grad()
    def postprocess(
        self, outputs: Outputs, metas: list[ImageMeta], test_cfg: TestConfig | None = None
    ) -> list[dict[str, torch.Tensor]]:
        cls_maps, reg_maps = outputs
        return postprocess(
            cls_maps, reg_maps, self.anchors(outputs), metas, self.num_classes, test_cfg or self.test_cfg
        )


def build_model(cfg: ModelConfig, pretrained_backbone: bool = True) -> RetinaNet:
    """A RetinaNet from its config; ImageNet backbone weights are loaded if the config names them
    and ``pretrained_backbone`` is true."""
    b = cfg.backbone
    backbone = build_backbone(
        b.depth,
        b.frozen_stages,
        b.norm_eval,
        b.pretrained if pretrained_backbone else None,
        b.kind,
        b.name,
        b.widths,
        b.stem,
    )
    n = cfg.neck
    if n.kind == "fpn":
        neck: nn.Module = FPN(list(backbone.out_channels), n.channels, n.separable)
    elif n.kind == "nasfpn":
        neck = NASFPN(
            list(backbone.out_channels),
            n.channels,
            parse_genotype(n.genotype),
            n.stacks,
            n.checkpoint_stacks,
            n.separable,
        )
    else:
        raise ValueError(f"unknown neck kind {n.kind!r}; use 'fpn' or 'nasfpn'")
    a = cfg.anchors
    anchor_generator = AnchorGenerator(a.strides, a.octave_base_scale, a.scales_per_octave, a.ratios)
    h = cfg.head
    head = RetinaHead(
        n.channels,
        h.num_classes,
        anchor_generator.num_anchors,
        h.stacked_convs,
        h.feat_channels,
        h.separate_bn,
        len(a.strides),
        h.prior_prob,
        h.separable,
    )
    lc = cfg.loss
    loss = RetinaLoss(
        h.num_classes,
        MaxIoUAssigner(lc.pos_iou_thr, lc.neg_iou_thr, lc.min_pos_iou, lc.match_low_quality),
        lc.focal_alpha,
        lc.focal_gamma,
        lc.cls_weight,
        lc.box_weight,
    )
    return RetinaNet(backbone, neck, head, anchor_generator, loss, cfg.test, h.deep_supervision, n.exit_stack)
