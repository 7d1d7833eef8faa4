"""The FPN of MMDetection's crop-640 RetinaNet config.

P3..P5 from 1x1 lateral convs (with bias, no norm) on C3..C5 and a nearest-upsampling top-down
path, each followed by a 3x3 conv + BN; P6 is a stride-2 3x3 conv + BN on C5 itself; P7 is a
stride-2 3x3 conv + BN on ReLU(P6). No activation on the outputs. With ``separable`` every 3x3
conv is depthwise-separable (the "FPNLite" of mobile detectors; the 1x1 laterals stay as they are).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nasfpn.models.layers import ConvBN, xavier_uniform_


class FPN(nn.Module):
    def __init__(self, in_channels: list[int], channels: int = 256, separable: bool = False) -> None:
        super().__init__()
        if len(in_channels) != 3:
            raise ValueError(f"FPN expects C3, C4, C5 (3 inputs), got {len(in_channels)}")
        self.out_channels = channels
        self.lateral_convs = nn.ModuleList(ConvBN(c, channels, 1, norm=False) for c in in_channels)
        # fpn_convs[0..2]: outputs P3..P5; [3]: P6 from C5; [4]: P7 from ReLU(P6).
        self.fpn_convs = nn.ModuleList(
            [ConvBN(channels, channels, 3, separable=separable) for _ in in_channels]
            + [
                ConvBN(in_channels[-1], channels, 3, stride=2, separable=separable),
                ConvBN(channels, channels, 3, stride=2, separable=separable),
            ]
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                xavier_uniform_(m)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest"
            )
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        p6 = self.fpn_convs[3](feats[-1])
        p7 = self.fpn_convs[4](torch.relu(p6))
        return [*outs, p6, p7]
