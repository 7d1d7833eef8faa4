"""Named configs. Each preset is one plain ``Config``; variants are ``dataclasses.replace`` of it.

The two crop-640 presets carry every value of MMDetection's
``configs/nas_fpn/retinanet_r50_{fpn,nasfpn}_crop640-50e_coco.py``: ResNet-50 (frozen stem +
layer1, BN trainable), RetinaSepBNHead, anchors 4 * 2^(k/3) x {0.5, 1, 2}, focal + L1 losses,
max-IoU assignment at 0.5/0.5, SGD 0.08 @ batch 64, warm-up 1000 iterations from 0.1x,
x0.1 at epochs 30 and 40 of 50, test-time score 0.05 / top-1000 / NMS 0.5 / 100 per image;
pad to a multiple of 64 (FPN) or 128 (NAS-FPN) at test time.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from nasfpn.core.config import (
    AnchorConfig,
    BackboneConfig,
    Config,
    DataConfig,
    HeadConfig,
    ModelConfig,
    NeckConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_from_file,
)

_R50_IMAGENET = BackboneConfig(depth=50, frozen_stages=1, norm_eval=False, pretrained="torchvision")

RETINANET_R50_NASFPN = Config(
    name="retinanet_r50_nasfpn_crop640_50e",
    model=ModelConfig(
        backbone=_R50_IMAGENET,
        neck=NeckConfig(kind="nasfpn", channels=256, stacks=7, genotype="nasfpn"),
        head=HeadConfig(num_classes=80, stacked_convs=4, feat_channels=256, separate_bn=True),
    ),
    data=DataConfig(image_size=640, pad_divisor=128, batch_size=8, workers=4),
    train=TrainConfig(),
)

RETINANET_R50_FPN = replace(
    RETINANET_R50_NASFPN,
    name="retinanet_r50_fpn_crop640_50e",
    model=replace(RETINANET_R50_NASFPN.model, neck=NeckConfig(kind="fpn", channels=256)),
    data=replace(RETINANET_R50_NASFPN.data, pad_divisor=64),
)


def nasfpn_scaled(stacks: int, width: int, size: int, depth: int = 50) -> Config:
    """The paper's scalable NAS-FPN family: stack count N, feature width, input size, backbone."""
    base = RETINANET_R50_NASFPN
    # Head width follows the pyramid width, as in the paper's scaled models.
    return replace(
        base,
        name=f"retinanet_r{depth}_nasfpn_{stacks}x{width}_{size}",
        model=replace(
            base.model,
            backbone=replace(base.model.backbone, depth=depth),
            neck=replace(base.model.neck, stacks=stacks, channels=width),
            head=replace(base.model.head, feat_channels=width),
        ),
        data=replace(base.data, image_size=size),
    )


# Small model for the embedded synthetic data (``nasfpn demo``): trains from scratch on a CPU.
# ResNet-10 (the paper's proxy backbone) made cheaper for 128 px: layer3 and layer4 of 128 channels
# instead of 256 and 512, and a stem of two 3x3 convs of stride 2 instead of the 7x7 conv and the
# max-pool (a training step 0.09-0.10 s against 0.13-0.15 s on a 2-core AMD EPYC, AP50 after 1,000
# demo steps 0.74-0.75 against 0.75-0.79, after 1,250 0.823; a narrower stem lost more), 2 NAS-FPN
# stacks of 64 channels, 128 px inputs (a
# multiple of the pad divisor, so that training crops and test images have the same size: the
# per-level BN of P6/P7 sees 2x2 and 1x1 maps and does not transfer to other sizes), anchors of
# 16 px and up at P3 for the 6-64 px synthetic shapes, channels-last (about 20% faster on CPU).
# lr 0.08 at batch 16 with gradient clipping learned fastest among 0.02-0.16 in short trials.
# The demo scales the epochs (and milestones) down when a machine is too slow for them.
NASFPN_TINY = Config(
    name="nasfpn_tiny",
    model=ModelConfig(
        backbone=BackboneConfig(
            depth=10, frozen_stages=0, norm_eval=False, pretrained=None, widths=(64, 128, 128, 128), stem="conv3x2"
        ),
        neck=NeckConfig(kind="nasfpn", channels=64, stacks=2, genotype="nasfpn"),
        head=HeadConfig(num_classes=80, stacked_convs=2, feat_channels=64, separate_bn=True),
        anchors=AnchorConfig(octave_base_scale=2.0),
    ),
    data=DataConfig(image_size=128, pad_divisor=128, batch_size=16, workers=0),
    train=TrainConfig(
        epochs=24,
        base_lr=0.08,
        base_batch_size=16,
        warmup_iters=100,
        milestones=(19, 22),
        grad_clip=10.0,
        channels_last=True,
        eval_interval=4,
    ),
)

# A mobile-sized detector: torchvision's MobileNetV2 trunk (C3/C4/C5 = features.6/13/18: 32, 96, 1280 channels)
# under 3 NAS-FPN stacks of 128 channels. 384 px, not 320: NAS-FPN pads to a multiple of 128 (P7), so 320 would
# be computed at 384 anyway.
NASFPN_MOBILENETV2 = replace(
    RETINANET_R50_NASFPN,
    name="nasfpn_mobilenetv2",
    model=replace(
        RETINANET_R50_NASFPN.model,
        backbone=BackboneConfig(kind="torchvision", name="mobilenet_v2", frozen_stages=1, pretrained="torchvision"),
        neck=NeckConfig(kind="nasfpn", channels=128, stacks=3, genotype="nasfpn"),
        head=replace(RETINANET_R50_NASFPN.model.head, feat_channels=128),
    ),
    data=replace(RETINANET_R50_NASFPN.data, image_size=384),
)

# The mobile "Lite" pair on MobileNetV2 at 320 px (docs/nasfpn_lite.md has the sources): every 3x3 conv of
# the neck and the head depthwise-separable, the head's tower BN per level, and the training recipe of
# TensorFlow's ssd_mobilenet_v2_fpnlite_320x320 in our terms (cosine from 0.08 at batch 128, 1,000 warm-up
# steps, weight decay 4e-5, ~50 epochs, nothing frozen). 320 = 5 x 64: padded to 64, P7 is 2x2 (the
# merging cells resample odd sizes as MMDetection does).
_LITE_RECIPE = TrainConfig(
    epochs=50,
    base_lr=0.08,
    base_batch_size=128,
    weight_decay=4e-5,
    warmup_iters=1000,
    lr_decay="cosine",
)
_MOBILENETV2 = BackboneConfig(kind="torchvision", name="mobilenet_v2", frozen_stages=0, pretrained="torchvision")

# SSDLite-style FPNLite, as TensorFlow's ssd_mobilenet_v2_fpnlite_320x320: P3..P7 of 128 channels, a shared
# head of 4 separable convs x 128, anchors 4 strides wide with 2 scales per octave.
FPNLITE_MOBILENETV2 = Config(
    name="fpnlite_mobilenetv2_320",
    model=ModelConfig(
        backbone=_MOBILENETV2,
        neck=NeckConfig(kind="fpn", channels=128, separable=True),
        head=HeadConfig(num_classes=80, stacked_convs=4, feat_channels=128, separate_bn=True, separable=True),
        anchors=AnchorConfig(octave_base_scale=4.0, scales_per_octave=2),
    ),
    data=DataConfig(image_size=320, pad_divisor=64, batch_size=16, workers=4),
    train=_LITE_RECIPE,
)

# NAS-FPNLite: the discovered cells with separable out convs, 7 stacks of 64 channels, a separable head of
# 4 x 64. The paper's own stack count and width for it were not in the sources we could read; 7 is the
# NAS-FPN default, 64 the narrowest width of TensorFlow's mobile configs that keeps 4 head convs cheap.
NASFPN_LITE_MOBILENETV2 = replace(
    FPNLITE_MOBILENETV2,
    name="nasfpn_lite_mobilenetv2_320",
    model=replace(
        FPNLITE_MOBILENETV2.model,
        neck=NeckConfig(kind="nasfpn", channels=64, stacks=7, genotype="nasfpn", separable=True),
        head=HeadConfig(num_classes=80, stacked_convs=4, feat_channels=64, separate_bn=True, separable=True),
        anchors=AnchorConfig(),
    ),
)


PRESETS: dict[str, Config] = {
    c.name: c
    for c in (
        RETINANET_R50_FPN,
        RETINANET_R50_NASFPN,
        # Paper Table 1 / Fig. 8 style scaling of the discovered pyramid.
        nasfpn_scaled(3, 256, 640),
        nasfpn_scaled(5, 256, 640),
        nasfpn_scaled(7, 256, 1024),
        nasfpn_scaled(7, 256, 1280),
        nasfpn_scaled(7, 384, 1280),
        nasfpn_scaled(7, 256, 1280, depth=101),
        NASFPN_TINY,
        NASFPN_MOBILENETV2,
        NASFPN_LITE_MOBILENETV2,
        FPNLITE_MOBILENETV2,
    )
}


def get_config(name_or_path: str | Path, overrides: list[str] | None = None, file: str | Path | None = None) -> Config:
    """A preset name or a YAML/JSON config file, refined by ``file`` and ``overrides``."""
    text = str(name_or_path)
    if text in PRESETS:
        cfg = PRESETS[text]
    elif text.endswith((".yaml", ".yml", ".json")):
        cfg = config_from_file(text)
    else:
        raise ValueError(f"unknown model {text!r}; presets: {', '.join(PRESETS)}; or give a .yaml/.json config file")
    return apply_overrides(cfg, overrides, file)


def resolve_config(
    model: str | Path | Config | None,
    overrides: list[str] | None = None,
    config_file: str | Path | None = None,
    file_config: dict[str, Any] | None = None,
) -> Config:
    """The config of every entry point (CLI, ``load``, predict, eval, ONNX runtime), by one rule.

    ``model`` is a ``Config``, a preset name or a YAML/JSON config file; ``None`` or ``"-"``
    takes ``file_config``, the config carried by a weights file (our .safetensors, an exported
    .onnx). Either is then refined by ``config_file`` and ``key=value`` ``overrides``.
    """
    if isinstance(model, Config):
        cfg = model
    elif model is not None and str(model) != "-":
        cfg = get_config(model)
    elif file_config is not None:
        cfg = config_from_dict(file_config)
    else:
        raise ValueError(
            "no config: name a preset (see `nasfpn config --list`) or a .yaml/.json config file, "
            "or pass weights that carry their config (our .safetensors or an exported .onnx)"
        )
    # A given Config is returned as it is when nothing refines it.
    return apply_overrides(cfg, overrides, config_file) if overrides or config_file else cfg
