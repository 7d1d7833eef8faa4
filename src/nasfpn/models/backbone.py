"""ResNet backbone (pytorch style: stride on the 3x3 conv), returning C3, C4, C5; ``build_backbone`` also
builds torchvision trunks (models/backbones_tv.py) and timm trunks (models/backbones_timm.py) behind the same
interface.

Module names equal torchvision's and MMDetection's (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer2.0.downsample.0``, ...), so ImageNet checkpoints of either load without renaming.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from nasfpn.core.weights import key_list, load_state_dict_file, resolve_source
from nasfpn.models.backbones_timm import TimmBackbone
from nasfpn.models.backbones_tv import TorchvisionBackbone
from nasfpn.models.frozen import StageFreezing

# depth -> (block, blocks per stage). Depth 10 is the paper's proxy-task backbone.
_SPECS: dict[int, tuple[type[tv_resnet.BasicBlock | tv_resnet.Bottleneck], list[int]]] = {
    10: (tv_resnet.BasicBlock, [1, 1, 1, 1]),
    18: (tv_resnet.BasicBlock, [2, 2, 2, 2]),
    34: (tv_resnet.BasicBlock, [3, 4, 6, 3]),
    50: (tv_resnet.Bottleneck, [3, 4, 6, 3]),
    101: (tv_resnet.Bottleneck, [3, 4, 23, 3]),
}

_TORCHVISION_WEIGHTS = {
    18: tv_resnet.ResNet18_Weights.IMAGENET1K_V1,
    34: tv_resnet.ResNet34_Weights.IMAGENET1K_V1,
    50: tv_resnet.ResNet50_Weights.IMAGENET1K_V1,
    101: tv_resnet.ResNet101_Weights.IMAGENET1K_V1,
}


class ResNet(StageFreezing):
    """ResNet trunk without the classifier.

    ``forward(x)`` returns ``[C3, C4, C5]`` (strides 8, 16, 32). ``out_channels`` (a tuple) and
    ``feature_channels`` (a list) give their channel counts for the neck. ``frozen_stages`` freezes the stem (1) and the first
    ``frozen_stages`` residual stages: no gradient, BN in eval mode. ``norm_eval`` keeps every
    BN in eval mode while training.
    """

    def __init__(self, depth: int = 50, frozen_stages: int = 1, norm_eval: bool = False) -> None:
        super().__init__()
        if depth not in _SPECS:
            raise ValueError(f"ResNet depth must be one of {sorted(_SPECS)}, got {depth}")
        if not 0 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in 0..4, got {frozen_stages}")
        block, layers = _SPECS[depth]
        net = tv_resnet.ResNet(block, layers)
        self.depth = depth
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        expansion = block.expansion
        self.feature_channels = [128 * expansion, 256 * expansion, 512 * expansion]
        self.out_channels = tuple(self.feature_channels)
        self.feature_strides = [8, 16, 32]
        self._freeze()

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages == 0:
            return []
        return [self.conv1, self.bn1] + [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]

    def load_imagenet(self, source: str) -> None:
        """Load ImageNet weights: "torchvision", an http(s) URL, or a local file (torchvision layout)."""
        if source == "torchvision":
            if self.depth not in _TORCHVISION_WEIGHTS:
                raise ValueError(f"torchvision publishes no ImageNet weights for ResNet-{self.depth}")
            source = _TORCHVISION_WEIGHTS[self.depth].url
        state = load_state_dict_file(resolve_source(source))
        state = {k.removeprefix("backbone."): v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"ImageNet weights {source} do not fit ResNet-{self.depth}: "
                f"missing {key_list(missing)}, "
                f"unexpected {key_list(unexpected)}"
            )


# The one backbone interface: ``forward(x)`` -> maps at strides 8, 16, 32; ``out_channels``; ``frozen_stages``
# and ``norm_eval`` honoured in ``train()``.
Backbone = ResNet | TorchvisionBackbone | TimmBackbone

BACKBONE_KINDS = ("resnet", "torchvision", "timm")


def build_backbone(
    depth: int,
    frozen_stages: int,
    norm_eval: bool,
    pretrained: str | Path | None = None,
    kind: str = "resnet",
    name: str = "",
) -> Backbone:
    """The backbone a ``BackboneConfig`` names (its fields, in order)."""
    if kind == "torchvision":
        if not name:
            raise ValueError(
                "model.backbone.kind=torchvision needs model.backbone.name, e.g. --set model.backbone.name=mobilenet_v2"
            )
        return TorchvisionBackbone(name, frozen_stages, norm_eval, pretrained)
    if kind == "timm":
        if not name:
            raise ValueError(
                "model.backbone.kind=timm needs model.backbone.name, e.g. --set model.backbone.name=efficientnet_b0"
            )
        return TimmBackbone(name, frozen_stages, norm_eval, pretrained)
    if kind != "resnet":
        raise ValueError(f"model.backbone.kind must be one of {list(BACKBONE_KINDS)}, got {kind!r}")
    model = ResNet(depth, frozen_stages, norm_eval)
    if pretrained:
        model.load_imagenet(str(pretrained))
    return model
