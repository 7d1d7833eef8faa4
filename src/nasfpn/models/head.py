"""RetinaNet head: conv towers shared across pyramid levels, then class and box predictors.

With ``separate_bn`` (MMDetection's RetinaSepBNHead) each tower conv is shared by all levels
but followed by one BN per level; without it (the plain RetinaNet head) the tower convs carry
a bias and no norm. With ``separable`` every 3x3 conv, predictors included, is depthwise-separable
(the head of NAS-FPNLite / SSDLite-style mobile detectors). Outputs per level: class logits ``(N, A*K, H, W)`` with channel
``anchor * K + class``, and box deltas ``(N, A*4, H, W)`` with channel ``anchor * 4 + (dx, dy, dw, dh)``.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from nasfpn.models.layers import SeparableConv2d, conv2d, output_conv


class RetinaHead(nn.Module):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_anchors: int,
        stacked_convs: int = 4,
        feat_channels: int = 256,
        separate_bn: bool = True,
        num_levels: int = 5,
        prior_prob: float = 0.01,
        separable: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.separate_bn = separate_bn
        self.num_levels = num_levels
        chans = [in_channels] + [feat_channels] * (stacked_convs - 1)
        self.cls_convs = nn.ModuleList(
            conv2d(c, feat_channels, 3, bias=not separate_bn, separable=separable) for c in chans
        )
        self.reg_convs = nn.ModuleList(
            conv2d(c, feat_channels, 3, bias=not separate_bn, separable=separable) for c in chans
        )
        if separate_bn:
            # cls_norms[level][i] follows cls_convs[i] on that level.
            self.cls_norms = nn.ModuleList(
                nn.ModuleList(nn.BatchNorm2d(feat_channels) for _ in chans) for _ in range(num_levels)
            )
            self.reg_norms = nn.ModuleList(
                nn.ModuleList(nn.BatchNorm2d(feat_channels) for _ in chans) for _ in range(num_levels)
            )
        self.retina_cls = conv2d(feat_channels, num_anchors * num_classes, 3, separable=separable)
        self.retina_reg = conv2d(feat_channels, num_anchors * 4, 3, separable=separable)

        for module in [*self.cls_convs, *self.reg_convs, self.retina_cls, self.retina_reg]:
            for conv in module.modules():
                if isinstance(conv, nn.Conv2d):
                    nn.init.normal_(conv.weight, std=0.01)
                    if conv.bias is not None:
                        nn.init.zeros_(conv.bias)
            if isinstance(module, SeparableConv2d):
                # The pointwise part keeps the head's std 0.01 (small outputs at the start, the focal
                # prior intact); a depthwise part at 0.01 too would scale every gradient of the pair by
                # 0.01 more, and the predictors hardly learn. Unit gain per channel instead.
                nn.init.normal_(module.depthwise.weight, std=1.0 / module.depthwise.kernel_size[0])
        # Focal-loss prior: every anchor starts as background with probability 1 - prior_prob.
        nn.init.constant_(self.cls_bias, -math.log((1 - prior_prob) / prior_prob))

    @property
    def cls_bias(self) -> torch.Tensor:
        """The classifier's output bias: one logit offset per (anchor, class) channel."""
        bias = output_conv(self.retina_cls).bias
        assert bias is not None  # the classifier is built with a bias
        return bias

    def _tower(self, x: torch.Tensor, convs: nn.ModuleList, norms: nn.ModuleList | None) -> torch.Tensor:
        for i, conv in enumerate(convs):
            x = conv(x)
            if norms is not None:
                x = norms[i](x)
            x = torch.relu(x)
        return x

    def forward(self, feats: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if len(feats) != self.num_levels:
            raise ValueError(f"head built for {self.num_levels} levels got {len(feats)}")
        cls_out, reg_out = [], []
        for level, x in enumerate(feats):
            # Each entry of cls_norms / reg_norms is the ModuleList of one level.
            cls_norms = cast(nn.ModuleList, self.cls_norms[level]) if self.separate_bn else None
            reg_norms = cast(nn.ModuleList, self.reg_norms[level]) if self.separate_bn else None
            cls_out.append(self.retina_cls(self._tower(x, self.cls_convs, cls_norms)))
            reg_out.append(self.retina_reg(self._tower(x, self.reg_convs, reg_norms)))
        return cls_out, reg_out
