"""torchvision classification networks as detection backbones, returning the maps at strides 8, 16, 32.

The trunk is torchvision's own model cut by ``torchvision.models.feature_extraction.create_feature_extractor``
(no copied code); its parameter names stay torchvision's (``features.3.conv.0.0.weight``, ``layer2.0.conv1.weight``,
``trunk_output.block2...``), so a torchvision ImageNet state dict loads as it is.

Which node gives which stride is measured, not listed: the model's top-level blocks (``features.<i>`` for
MobileNet / EfficientNet / MNASNet, ``layer<i>`` for ResNet / ResNeXt / Wide ResNet, ``trunk_output.block<i>`` for
RegNet) run once on a small input, and the last block at each stride is returned.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.fx.experimental.optimization import fuse
from torchvision.models.feature_extraction import create_feature_extractor

from nasfpn.core.weights import key_list, load_state_dict_file, resolve_source
from nasfpn.models.frozen import StageFreezing

STRIDES = (8, 16, 32)


def _blocks(model: nn.Module, name: str) -> list[str]:
    """The model's top-level blocks, in forward order (only those with parameters matter for freezing)."""
    if isinstance(getattr(model, "features", None), nn.Sequential):
        return [f"features.{i}" for i in range(len(model.features))]  # type: ignore[arg-type]
    if hasattr(model, "layer4"):
        return ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    if hasattr(model, "trunk_output"):
        return ["stem"] + [f"trunk_output.{n}" for n, _ in model.trunk_output.named_children()]  # type: ignore[union-attr]
    raise ValueError(
        f"torchvision model {name!r} has no known block layout (features / layer1..4 / trunk_output); "
        "use a MobileNet, EfficientNet, MNASNet, ResNet, ResNeXt, Wide ResNet or RegNet"
    )


def _block_strides(model: nn.Module, blocks: list[str], size: int = 64) -> list[tuple[int, int]]:
    """``(stride, channels)`` of each block's output for a ``size`` x ``size`` input."""
    out: dict[str, tuple[int, int]] = {}
    hooks = [
        model.get_submodule(b).register_forward_hook(
            lambda _m, _i, y, b=b: out.__setitem__(b, (size // y.shape[-1], y.shape[1]))
        )
        for b in blocks
    ]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return [out[b] for b in blocks]


class TorchvisionBackbone(StageFreezing):
    """A torchvision classifier's trunk. ``forward(x)`` returns ``[C3, C4, C5]`` (strides 8, 16, 32);
    ``out_channels`` (also ``feature_channels``) gives their channel counts.

    ``frozen_stages`` k freezes (no gradient, BN in eval mode) every block up to stride ``2**(k+1)``, as for
    ResNet: 1 = stem and the stride-4 blocks, 2 = also the stride-8 ones, ... ``norm_eval`` keeps every BN in
    eval mode while training.
    """

    def __init__(
        self, name: str, frozen_stages: int = 1, norm_eval: bool = False, pretrained: str | Path | None = None
    ) -> None:
        super().__init__()
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(
                f"model.backbone.name {name!r} is not a torchvision classification model; "
                "e.g. mobilenet_v2, mobilenet_v3_large, resnext50_32x4d, efficientnet_b0, regnet_y_400mf"
            )
        if not 0 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in 0..4, got {frozen_stages}")
        model = torchvision.models.get_model(name, weights=None)
        if pretrained:
            _load_torchvision(model, name, str(pretrained))
        blocks = _blocks(model, name)
        shapes = _block_strides(model, blocks)
        nodes: dict[int, str] = {}
        channels: dict[int, int] = {}
        for block, (stride, ch) in zip(blocks, shapes):
            if stride in STRIDES:
                nodes[stride], channels[stride] = block, ch  # the last block at each stride wins
        if set(nodes) != set(STRIDES):
            raise ValueError(f"torchvision model {name!r} gives strides {sorted(nodes)}, not {list(STRIDES)}")
        self.name = name
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.return_nodes = tuple(nodes[s] for s in STRIDES)
        self.out_channels = tuple(channels[s] for s in STRIDES)
        self.feature_channels = list(self.out_channels)
        self.feature_strides = list(STRIDES)
        self.body = create_feature_extractor(model, {n: f"c{s}" for n, s in zip(self.return_nodes, STRIDES)})
        self._frozen = [
            b for b, (stride, _) in zip(blocks, shapes) if frozen_stages and stride <= 2 ** (frozen_stages + 1)
        ]
        self._freeze()

    def _frozen_modules(self) -> list[nn.Module]:
        return [self.body.get_submodule(b) for b in self._frozen]

    @torch.no_grad()
    def fold_batchnorm(self) -> None:
        """Fold every BN (eval statistics) into the conv before it, in place, for inference; the model must be
        in eval mode. torch.fx's own conv-BN fusion does it on the traced trunk."""
        if self.training:
            raise ValueError("fold BN on an eval-mode backbone (BN must use its running statistics)")
        self.body = fuse(self.body, inplace=True).eval()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.body(x)
        return [out[f"c{s}"] for s in STRIDES]


def _load_torchvision(model: nn.Module, name: str, source: str) -> None:
    """ImageNet weights into the whole torchvision model: "torchvision" (its default weights), a URL or a file
    holding a torchvision state dict."""
    if source == "torchvision":
        source = torchvision.models.get_model_weights(name).DEFAULT.url
    state = load_state_dict_file(resolve_source(source))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights {source} do not fit torchvision {name} (a torchvision state dict is expected): "
            f"missing {key_list(missing)}, "
            f"unexpected {key_list(unexpected)}"
        )
