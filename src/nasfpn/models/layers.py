"""Small building blocks shared by the necks and the head."""

from __future__ import annotations

import math

import torch
from torch import nn


class ConvBN(nn.Module):
    """Conv2d followed by BatchNorm (then the conv has no bias: BN cancels it), optional ReLU.

    With ``norm=False`` it is a plain conv with bias. Child names ``conv`` and ``bn`` match
    MMDetection's ConvModule, so its state-dict keys map one to one.
    """

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, norm: bool = True, relu: bool = False
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=not norm)
        self.bn = nn.BatchNorm2d(out_ch) if norm else None
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return torch.relu(x) if self.relu else x


def xavier_uniform_(conv: nn.Conv2d, gain: float = 1.0) -> None:
    nn.init.xavier_uniform_(conv.weight, gain=gain)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def caffe2_xavier_(conv: nn.Conv2d) -> None:
    """Caffe2's "XavierFill": U(-sqrt(3/fan_in), sqrt(3/fan_in)), zero bias."""
    fan_in = conv.weight[0].numel()
    bound = math.sqrt(3.0 / fan_in)
    nn.init.uniform_(conv.weight, -bound, bound)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
