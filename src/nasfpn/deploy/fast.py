"""Inference fast paths: BatchNorm folding, channels-last, reduced precision, ``torch.compile``.

    fast = optimize_for_inference(model)              # BN folded, channels-last, fp32
    outputs = fast(images)                            # same contract as RetinaNet.forward
    detections = fast.postprocess(outputs, metas)

``optimize_for_inference`` never touches the model it is given: it works on a copy and returns an
eval-only ``InferenceModel``. What each option does:

- ``fuse_bn``: every BatchNorm (eval statistics) is folded into the conv before it: the ResNet
  convs, FPN / NAS-FPN ``ConvBN`` and the ReLU -> conv -> BN out convs of the merging cells (BN
  follows the conv there, so it folds into it like anywhere else). A torchvision trunk folds its
  BN with torch.fx's conv-BN fusion, a timm trunk each BN that directly follows a conv
  (``TimmBackbone.fold_batchnorm``); the BN a timm trunk cannot fold (pre-activation nets put BN
  before the conv; a trunk torch.fx cannot trace keeps all of its BN) stays unfused there, the
  rest of the model is folded as usual. The separated-BN head shares
  each tower conv across levels with one BN per level; folding gives every level its own copy of
  the tower convs (``FoldedRetinaHead``): same FLOPs, one memory pass less per conv, 5x the tower
  weights (94 MB instead of 19 MB for the R50 presets). On CPU this measured the same as keeping
  the shared convs plus a per-level affine (within 2%, benchmarks/RESULTS.md); we keep the
  per-level convs because no BN is left anywhere, the forward is plain conv + bias + ReLU (which
  compilers and GPUs fuse), and where convs are not compute-bound the saved pass counts.
- ``channels_last``: weights and the input in NHWC (oneDNN on CPU, tensor cores on CUDA). Head
  maps then come out NHWC, so the ``permute(0, 2, 3, 1)`` of post-processing is free.
- ``precision``: ``"bf16"`` / ``"fp16"`` cast the (folded) weights and the input; the head maps
  are cast back to float32, so post-processing always sees float32. bf16 needs AVX512-BF16 or AMX
  on CPU to be faster; fp16 is for CUDA.
- ``compile``: ``torch.compile`` of backbone + neck + head only; anchors, decoding and NMS stay
  eager. On CPU, inductor's ``freezing`` constant-folds the weights into pre-packed oneDNN
  layouts. The first call per input shape compiles (tens of seconds).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.resnet import BasicBlock, Bottleneck

from nasfpn.core.config import TestConfig
from nasfpn.core.precision import PRECISIONS
from nasfpn.core.structures import ImageMeta
from nasfpn.models.backbone import ResNet
from nasfpn.models.backbones_timm import TimmBackbone
from nasfpn.models.detector import Outputs, RetinaNet
from nasfpn.models.head import RetinaHead
from nasfpn.models.layers import ConvBN, SeparableConv2d
from nasfpn.models.nasfpn import ReLUConvBN

# --------------------------------------------------------------------------- BN folding


def _fused(conv: nn.Module, bn: nn.BatchNorm2d) -> nn.Module:
    """A copy of ``conv`` (plain, or separable: BN folds into its pointwise part) with ``bn`` folded in."""
    if isinstance(conv, SeparableConv2d):
        fused = copy.deepcopy(conv)
        fused.pointwise = fuse_conv_bn_eval(conv.pointwise, bn)
        return fused
    return fuse_conv_bn_eval(cast(nn.Conv2d, conv), bn)


def _fold(module: nn.Module, conv_name: str, bn_name: str) -> None:
    """``module.<conv_name>`` absorbs ``module.<bn_name>``, which becomes an identity."""
    conv, bn = getattr(module, conv_name), getattr(module, bn_name)
    setattr(module, conv_name, _fused(conv, bn))
    setattr(module, bn_name, nn.Identity())


def _fold_resnet(backbone: ResNet) -> None:
    if isinstance(backbone.stem_in, nn.Sequential):
        _fold(backbone.stem_in, "0", "1")  # Sequential(conv, bn, relu)
    _fold(backbone, "conv1", "bn1")
    for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4):
        for block in layer:
            pairs = 3 if isinstance(block, Bottleneck) else 2
            if not isinstance(block, (BasicBlock, Bottleneck)):
                raise TypeError(f"cannot fold BN in a {type(block).__name__} block")
            for i in range(1, pairs + 1):
                _fold(block, f"conv{i}", f"bn{i}")
            if block.downsample is not None:
                _fold(block.downsample, "0", "1")  # Sequential(conv, bn)


def _folded_tower(convs: nn.ModuleList, norms: nn.Module) -> nn.ModuleList:
    """One level's copy of the shared tower convs with that level's BNs folded in."""
    pairs = zip(convs, norms.children())
    return nn.ModuleList(_fused(conv, cast(nn.BatchNorm2d, bn)) for conv, bn in pairs)


class FoldedRetinaHead(nn.Module):
    """A separated-BN ``RetinaHead`` with each level's BN folded into its own copy of the shared
    tower convs. Same outputs as the head it was made from (eval statistics), same FLOPs."""

    def __init__(self, head: RetinaHead) -> None:
        super().__init__()
        if not head.separate_bn:
            raise ValueError("only a separated-BN head has per-level BN to fold")
        self.num_classes = head.num_classes
        self.num_anchors = head.num_anchors
        self.num_levels = head.num_levels
        # cls_towers[level][i] = cls_convs[i] with cls_norms[level][i] folded in.
        self.cls_towers = nn.ModuleList(_folded_tower(head.cls_convs, norms) for norms in head.cls_norms)
        self.reg_towers = nn.ModuleList(_folded_tower(head.reg_convs, norms) for norms in head.reg_norms)
        self.retina_cls = head.retina_cls
        self.retina_reg = head.retina_reg

    @staticmethod
    def _tower(x: torch.Tensor, convs: nn.Module) -> torch.Tensor:
        for conv in convs.children():
            x = torch.relu_(conv(x))  # in place: the conv output is a fresh tensor
        return x

    def forward(self, feats: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if len(feats) != self.num_levels:
            raise ValueError(f"head built for {self.num_levels} levels got {len(feats)}")
        cls_out = [self.retina_cls(self._tower(x, convs)) for x, convs in zip(feats, self.cls_towers)]
        reg_out = [self.retina_reg(self._tower(x, convs)) for x, convs in zip(feats, self.reg_towers)]
        return cls_out, reg_out


@torch.no_grad()
def fold_batchnorm(model: RetinaNet) -> RetinaNet:
    """Fold every BN of an eval-mode ``model`` into the conv before it, in place; returns ``model``.

    Raises ``ValueError`` if a BN is left over (a module this function does not know), except those a timm
    trunk reports it cannot fold (``TimmBackbone.fold_batchnorm``), which stay unfused.
    """
    if model.training:
        raise ValueError("fold BN on an eval-mode model (BN must use its running statistics)")
    kept: set[str] = set()  # BN a timm trunk cannot fold (e.g. before its conv): left as they are
    if isinstance(model.backbone, ResNet):
        _fold_resnet(model.backbone)
    elif isinstance(model.backbone, TimmBackbone):
        kept = {f"backbone.body.{n}" for n in model.backbone.fold_batchnorm()}
    else:
        model.backbone.fold_batchnorm()  # a torchvision trunk folds its own (torch.fx conv-BN fusion)
    for m in model.neck.modules():
        # A ConvBN without norm has no BN to fold; a ReLUConvBN always has one.
        if (isinstance(m, ConvBN) and isinstance(m.bn, nn.BatchNorm2d)) or isinstance(m, ReLUConvBN):
            _fold(m, "conv", "bn")
    if isinstance(model.head, RetinaHead) and model.head.separate_bn:
        model.head = FoldedRetinaHead(model.head)  # type: ignore[assignment]  # same forward contract
    left = [
        name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and name not in kept
    ]
    if left:
        raise ValueError(f"BN not folded: {left[:5]}{'...' if len(left) > 5 else ''}")
    return model


# --------------------------------------------------------------------------- the inference module


@contextlib.contextmanager
def flush_denormals(device: torch.device) -> Iterator[None]:
    """On CPU, float32 results below the normal range (< 1.2e-38) become zero inside the block.

    Denormal arithmetic is 10-100x slower on x86: an untrained or barely trained MobileNetV2 (BN with
    its initial statistics) shrinks its activations into that range and ran 8.9 s instead of 0.28 s
    per 320 px image (2-core AMD EPYC). Values that small change no detection. Afterwards the flag is
    cleared (torch has no getter for it, so a process that set it itself has to set it again).
    """
    if device.type != "cpu" or not torch.set_flush_denormal(True):  # False: this CPU cannot flush
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


class InferenceModel(nn.Module):
    """An eval-only RetinaNet behind fast paths; ``forward`` / ``postprocess`` as ``RetinaNet``'s.

    ``forward(images)`` takes the float32 ``(N, 3, H, W)`` batch of ``nasfpn.data`` (any memory
    format) and returns float32 per-level maps, whatever ``precision`` runs inside.
    """

    def __init__(
        self, model: RetinaNet, dtype: torch.dtype = torch.float32, channels_last: bool = False, compile: bool = False
    ) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.channels_last = channels_last
        self.compiled = compile
        self._core = self._forward
        if compile:
            options: dict[str, Any] | None = (
                {"freezing": True} if next(model.parameters()).device.type == "cpu" else None
            )
            self._core = torch.compile(self._forward, dynamic=False, options=options)

    # RetinaNet's attributes that callers use.
    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def anchor_generator(self):
        return self.model.anchor_generator

    @property
    def test_cfg(self) -> TestConfig:
        return self.model.test_cfg

    def train(self, mode: bool = True) -> InferenceModel:
        if mode:
            raise RuntimeError("an InferenceModel is eval-only: train the original model and optimise it again")
        return super().train(False)

    def _forward(self, images: torch.Tensor, stacks: int | None = None) -> Outputs:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        cls_maps, reg_maps = self.model(images.to(self.dtype), stacks)
        return [m.float() for m in cls_maps], [m.float() for m in reg_maps]

    @torch.no_grad()
    def forward(self, images: torch.Tensor, stacks: int | None = None) -> Outputs:
        with flush_denormals(images.device):
            return self._core(images, stacks)

    def anchors(self, outputs: Outputs) -> list[torch.Tensor]:
        return self.model.anchors(outputs)

    @torch.no_grad()
    def postprocess(
        self, outputs: Outputs, metas: list[ImageMeta], test_cfg: TestConfig | None = None
    ) -> list[dict[str, torch.Tensor]]:
        return self.model.postprocess(outputs, metas, test_cfg)


def optimize_for_inference(
    model: RetinaNet,
    fuse_bn: bool = True,
    channels_last: bool | None = None,
    precision: str = "fp32",
    compile: bool = False,
) -> InferenceModel:
    """A new eval-only ``InferenceModel`` of ``model`` (which is left as it is).

    ``channels_last=None`` means on: it was faster on CPU (oneDNN) in every measurement
    (benchmarks/RESULTS.md), and it is the layout CUDA tensor cores want.
    ``precision``: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (see the module docstring).
    """
    if isinstance(model, InferenceModel):
        raise ValueError("model is already optimised; pass the original RetinaNet")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    device = next(model.parameters()).device
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("fp16 inference is for CUDA; use precision='bf16' on CPU")
    net = copy.deepcopy(model).eval()
    net.requires_grad_(False)
    if fuse_bn:
        fold_batchnorm(net)
    channels_last = True if channels_last is None else channels_last
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    dtype = PRECISIONS[precision]
    if dtype != torch.float32:
        net = net.to(dtype)
    return InferenceModel(net, dtype, channels_last, compile).eval()
