"""Small building blocks shared by the necks and the head."""

from __future__ import annotations

import math

import torch
from torch import nn


class SeparableConv2d(nn.Module):
    """Depthwise k x k conv (no bias), then a pointwise 1 x 1 conv, nothing in between: the
    depthwise-separable convolution of the "Lite" necks and heads (TensorFlow's SeparableConv2D).

    It costs 1/out_ch + 1/k^2 of the full conv's multiply-adds: 1/8 for 3 x 3 at 64 channels.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_ch, in_ch, kernel, stride=stride, padding=kernel // 2, groups=in_ch, bias=False)
        self.pointwise = nn.Conv2d(in_ch, out_ch, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def conv2d(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, bias: bool = True, separable: bool = False
) -> nn.Conv2d | SeparableConv2d:
    """A k x k conv with "same" padding, or with ``separable`` its depthwise-separable form
    (a 1 x 1 conv stays a plain conv: there is nothing to separate)."""
    if separable and kernel > 1:
        return SeparableConv2d(in_ch, out_ch, kernel, stride=stride, bias=bias)
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=bias)


def output_conv(module: nn.Module) -> nn.Conv2d:
    """The conv whose output is the module's output (a plain conv itself, a separable conv's pointwise)."""
    if isinstance(module, SeparableConv2d):
        return module.pointwise
    if isinstance(module, nn.Conv2d):
        return module
    raise TypeError(f"not a conv: {type(module).__name__}")


class ConvBN(nn.Module):
    """Conv2d followed by BatchNorm (then the conv has no bias: BN cancels it), optional ReLU.

    With ``norm=False`` it is a plain conv with bias; with ``separable`` the conv is depthwise-
    separable. Child names ``conv`` and ``bn`` match MMDetection's ConvModule, so its state-dict
    keys map one to one.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        stride: int = 1,
        norm: bool = True,
        relu: bool = False,
        separable: bool = False,
    ) -> None:
        super().__init__()
        self.conv = conv2d(in_ch, out_ch, kernel, stride=stride, bias=not norm, separable=separable)
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
