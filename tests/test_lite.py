"""The mobile "Lite" models: depthwise-separable convs in the neck and the head (NAS-FPNLite,
FPNLite), through BN folding, fine-tuning, ONNX export and the search's full-size config."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deploy_helpers import fill_deterministic
from nasfpn.cli import main
from nasfpn.core.config import config_from_file
from nasfpn.core.presets import PRESETS, get_config
from nasfpn.deploy import export as ex
from nasfpn.deploy.fast import fold_batchnorm
from nasfpn.deploy.predictor import Detector, export_weights
from nasfpn.engine.finetune import transfer_weights
from nasfpn.models import build_model
from nasfpn.models.layers import SeparableConv2d, conv2d
from nasfpn.models.nasfpn import NASFPN_GENOTYPE
from nasfpn.models.summary import count_flops
from nasfpn.search.proxy import ProxySettings, full_size_config, proxy_config

LITE = ("nasfpn_lite_mobilenetv2_320", "fpnlite_mobilenetv2_320")


def _small(name: str, overrides: list[str] = ()) -> tuple:
    """The preset's neck and head (at most 2 stacks) on a ResNet-10 at 128 px, 3 classes: the Lite parts,
    cheaply (the MobileNetV2 trunk itself is tested in test_backbones and test_models)."""
    cfg = get_config(
        name,
        [
            "model.backbone.kind=resnet",
            "model.backbone.depth=10",
            "model.backbone.pretrained=null",
            "model.head.num_classes=3",
            "data.image_size=128",
            f"model.neck.stacks={min(PRESETS[name].model.neck.stacks, 2)}",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, pretrained_backbone=False)


def test_separable_conv_is_a_depthwise_then_a_pointwise_conv():
    conv = SeparableConv2d(6, 10, 3, stride=2)
    x = torch.randn(2, 6, 9, 11)
    depthwise = F.conv2d(x, conv.depthwise.weight, None, stride=2, padding=1, groups=6)
    expected = F.conv2d(depthwise, conv.pointwise.weight, conv.pointwise.bias)
    torch.testing.assert_close(conv(x), expected)
    assert sum(p.numel() for p in conv.parameters()) == 9 * 6 + 6 * 10 + 10
    # A 1x1 conv has nothing to separate; a full conv stays available.
    assert isinstance(conv2d(6, 10, 1, separable=True), nn.Conv2d)
    assert conv2d(6, 10, 3).groups == 1


@pytest.mark.parametrize("name", LITE)
def test_lite_necks_and_heads_have_no_full_3x3_conv(name):
    _, model = _small(name)
    for part in (model.neck, model.head):
        for key, m in part.named_modules():
            if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1):
                assert m.groups == m.in_channels, f"{key} is a full {m.kernel_size} conv"
    # The same model with full convs costs several times more in the neck and the head.
    _, full = _small(name, ["model.neck.separable=false", "model.head.separable=false"])
    backbone = count_flops(model, 128) - _neck_head_flops(model)
    assert backbone == count_flops(full, 128) - _neck_head_flops(full)
    assert _neck_head_flops(model) < 0.35 * _neck_head_flops(full)


def _neck_head_flops(model) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.no_grad():
        feats = model.backbone(torch.zeros(1, 3, 128, 128))
        with FlopCounterMode(display=False) as counter:
            model.head(model.neck(feats))
    return int(counter.get_total_flops())


@pytest.mark.parametrize("name", LITE)
def test_bn_folding_keeps_the_outputs_of_a_lite_model(name):
    _, model = _small(name)
    fill_deterministic(model)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
        folded = fold_batchnorm(fill_deterministic(_small(name)[1]))
        out = folded(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    for a, b in zip(out[0] + out[1], ref[0] + ref[1]):
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-4


def test_a_new_class_set_reinitialises_only_the_pointwise_part_of_a_separable_classifier(tmp_path):
    cfg, source = _small(LITE[0])
    cfg = replace(cfg, data=replace(cfg.data, class_names=("a", "b", "c"), category_ids=(1, 2, 3)))
    path = tmp_path / "source.safetensors"
    export_weights(fill_deterministic(source), cfg, path)
    target_cfg = replace(cfg, model=replace(cfg.model, head=replace(cfg.model.head, num_classes=2)))
    target_cfg = replace(target_cfg, data=replace(target_cfg.data, class_names=("x", "y"), category_ids=(1, 2)))
    model = build_model(target_cfg.model, pretrained_backbone=False)
    report = transfer_weights(model, target_cfg, lambda line: None, source=str(path))
    assert sorted(report.reinitialised) == ["head.retina_cls.pointwise.bias", "head.retina_cls.pointwise.weight"]
    assert "head.retina_cls.depthwise.weight" in report.loaded
    assert torch.equal(model.state_dict()["head.retina_cls.depthwise.weight"], source.head.retina_cls.depthwise.weight)


def test_a_lite_model_exports_to_onnx_and_the_file_matches_pytorch(tmp_path):
    pytest.importorskip("onnxruntime")
    cfg, model = _small(LITE[0], ["model.neck.stacks=1"])
    detector = Detector(fill_deterministic(model), cfg, optimize=False)
    _, report = ex.export(detector, tmp_path / "lite.onnx")
    assert report is not None and report.ok and report.images > 0


def test_a_searched_pyramid_builds_in_the_lite_form():
    cfg = full_size_config(NASFPN_GENOTYPE, "nasfpn_lite_mobilenetv2_320")
    assert cfg.model.neck.separable and cfg.model.head.separable
    model = build_model(
        replace(
            cfg.model, backbone=replace(cfg.model.backbone, pretrained=None), neck=replace(cfg.model.neck, stacks=1)
        ),
        pretrained_backbone=False,
    )
    cells = [m for m in model.neck.modules() if isinstance(m, SeparableConv2d)]
    assert len(cells) == sum(c.out_conv for c in NASFPN_GENOTYPE.cells)


def test_a_search_writes_its_pyramid_into_the_lite_preset_and_trains_lite_proxies(tmp_path):
    out = tmp_path / "s"
    args = ["search", "--fake-evaluator", "--trials", "3", "--workers", "0", "--no-baselines", "--out", str(out)]
    assert main([*args, "--full-preset", "nasfpn_lite_mobilenetv2_320"]) == 0
    best = config_from_file(out / "best_config.yaml")
    assert best.model.neck.separable and best.model.head.separable
    assert best.model.backbone.name == "mobilenet_v2"
    settings = ProxySettings(separable=True)
    proxy = proxy_config(NASFPN_GENOTYPE, settings, num_classes=3)
    assert proxy.model.neck.separable and proxy.model.head.separable
