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


RESNET_WIDTHS = (64, 128, 256, 512)
"""ResNet's own channels of layer1..layer4 (the ones ImageNet weights fit)."""
STEMS = ("conv7", "conv3x2")


def _stage(
    block: type[tv_resnet.BasicBlock | tv_resnet.Bottleneck], inplanes: int, planes: int, blocks: int, stride: int
) -> nn.Sequential:
    """One residual stage in torchvision's layout (``0.conv1``, ``0.downsample.0``, ...)."""
    out = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
    return nn.Sequential(block(inplanes, planes, stride, downsample), *(block(out, planes) for _ in range(1, blocks)))


class ResNet(StageFreezing):
    """ResNet trunk without the classifier.

    ``forward(x)`` returns ``[C3, C4, C5]`` (strides 8, 16, 32). ``out_channels`` (a tuple) and
    ``feature_channels`` (a list) give their channel counts for the neck. ``frozen_stages`` freezes the stem (1) and the first
    ``frozen_stages`` residual stages: no gradient, BN in eval mode. ``norm_eval`` keeps every
    BN in eval mode while training. ``widths`` (layer1..layer4) and ``stem`` other than ResNet's
    (``RESNET_WIDTHS``, "conv7") make a trunk for training from scratch (``BackboneConfig``).
    """

    def __init__(
        self,
        depth: int = 50,
        frozen_stages: int = 1,
        norm_eval: bool = False,
        widths: tuple[int, ...] = RESNET_WIDTHS,
        stem: str = "conv7",
    ) -> None:
        super().__init__()
        if depth not in _SPECS:
            raise ValueError(f"ResNet depth must be one of {sorted(_SPECS)}, got {depth}")
        if not 0 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in 0..4, got {frozen_stages}")
        widths = tuple(int(w) for w in widths)
        if len(widths) != 4 or min(widths) < 2:
            raise ValueError(f"ResNet widths must be 4 channel counts >= 2 (layer1..layer4), got {widths}")
        if stem not in STEMS:
            raise ValueError(f"ResNet stem must be one of {list(STEMS)}, got {stem!r}")
        block, layers = _SPECS[depth]
        net = tv_resnet.ResNet(block, layers)
        self.depth = depth
        self.widths = widths
        self.stem = stem
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        # The stem: stem_in (nothing for ResNet's) -> conv1 -> bn1 -> relu -> maxpool.
        self.stem_in: nn.Module = nn.Identity()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        if self.reshaped:  # built as torchvision's first, so ResNet's own trunk keeps its exact initialisation
            self._reshape(block, layers)
        expansion = block.expansion
        self.feature_channels = [w * expansion for w in widths[1:]]
        self.out_channels = tuple(self.feature_channels)
        self.feature_strides = [8, 16, 32]
        self._freeze()

    @property
    def reshaped(self) -> bool:
        """Widths or stem other than ResNet's own (no ImageNet weights fit)."""
        return self.widths != RESNET_WIDTHS or self.stem != "conv7"

    def _reshape(self, block: type[tv_resnet.BasicBlock | tv_resnet.Bottleneck], layers: list[int]) -> None:
        """New stem and stages for ``self.widths`` / ``self.stem``, initialised as torchvision's."""
        w0 = self.widths[0]
        if self.stem == "conv3x2":  # stride 4 in two 3x3 convs: the 7x7 conv and the max-pool cost the most at 128 px
            half = w0 // 2
            self.stem_in = nn.Sequential(
                nn.Conv2d(3, half, 3, 2, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True)
            )
            self.conv1 = nn.Conv2d(half, w0, 3, 2, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, w0, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w0)
        inplanes = w0
        for i, (planes, blocks) in enumerate(zip(self.widths, layers, strict=True)):
            setattr(self, f"layer{i + 1}", _stage(block, inplanes, planes, blocks, 1 if i == 0 else 2))
            inplanes = planes * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages == 0:
            return []
        stem = [self.stem_in, self.conv1, self.bn1]
        return stem + [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.stem_in(x)))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]

    def load_imagenet(self, source: str) -> None:
        """Load ImageNet weights: "torchvision", an http(s) URL, or a local file (torchvision layout)."""
        if self.reshaped:
            raise ValueError(
                f"ImageNet weights fit ResNet's own widths {RESNET_WIDTHS} and 7x7 stem only, not widths "
                f"{self.widths} with stem {self.stem!r}: train this trunk from scratch (backbone.pretrained=null)"
            )
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
    widths: tuple[int, ...] = RESNET_WIDTHS,
    stem: str = "conv7",
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
    model = ResNet(depth, frozen_stages, norm_eval, widths, stem)
    if pretrained:
        model.load_imagenet(str(pretrained))
    return model
