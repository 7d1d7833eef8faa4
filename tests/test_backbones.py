"""The backbone interface: torchvision trunks at strides 8/16/32, freezing, torchvision-layout weights,
the whole detector on top of them, and the ResNet presets' parameter names left as they were."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
import torch
import torchvision

from engine_utils import read_log, synthetic_data, tiny_config, train_args
from nasfpn.cli import main
from nasfpn.core.config import BackboneConfig, config_to_yaml
from nasfpn.core.presets import PRESETS
from nasfpn.deploy.fast import optimize_for_inference
from nasfpn.models.backbone import build_backbone
from nasfpn.models.backbones_tv import TorchvisionBackbone
from nasfpn.models.detector import build_model

# name -> (C3, C4, C5 nodes, channels): the last block at each stride, measured by the backbone itself.
EXPECTED = {
    "mobilenet_v2": (("features.6", "features.13", "features.18"), (32, 96, 1280)),
    "mobilenet_v3_large": (("features.6", "features.12", "features.16"), (40, 112, 960)),
    "resnext50_32x4d": (("layer2", "layer3", "layer4"), (512, 1024, 2048)),
    "efficientnet_b0": (("features.3", "features.5", "features.8"), (40, 112, 1280)),
    "regnet_y_400mf": (("trunk_output.block2", "trunk_output.block3", "trunk_output.block4"), (104, 208, 440)),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_torchvision_backbone_strides_and_channels(name):
    nodes, channels = EXPECTED[name]
    backbone = TorchvisionBackbone(name, frozen_stages=0).eval()
    assert backbone.return_nodes == nodes and backbone.out_channels == channels
    with torch.no_grad():
        feats = backbone(torch.zeros(1, 3, 128, 128))
    assert [tuple(f.shape[1:]) for f in feats] == [(c, 128 // s, 128 // s) for c, s in zip(channels, (8, 16, 32))]


def _tiny_model_cfg(name: str):
    cfg = tiny_config().model
    return replace(cfg, backbone=BackboneConfig(kind="torchvision", name=name, frozen_stages=0, pretrained=None))


@pytest.mark.parametrize("name", ["mobilenet_v2", "regnet_y_400mf"])
def test_detector_on_a_torchvision_backbone(name):
    model = build_model(_tiny_model_cfg(name)).eval()
    assert model.neck.lateral_convs[0].conv.in_channels == EXPECTED[name][1][0]
    with torch.no_grad():
        cls_maps, reg_maps = model(torch.zeros(1, 3, 128, 128))
    assert [m.shape[-1] for m in cls_maps] == [16, 8, 4, 2, 1] and len(reg_maps) == 5


def _assert_folding_keeps_outputs(model: torch.nn.Module, statistics_of: torch.nn.Module) -> None:
    """The fast path folds every BN of ``model`` and gives its outputs, with non-trivial BN
    statistics in ``statistics_of`` (so that a wrong fold shows)."""
    for m in statistics_of.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    fast = optimize_for_inference(model, fuse_bn=True, channels_last=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        plain, folded = model(x), fast(x)
    for a, b in zip(plain[0] + plain[1], folded[0] + folded[1]):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "regnet_y_400mf"])
def test_inference_fast_path_folds_the_trunks_batchnorm(name):
    torch.manual_seed(0)
    model = build_model(_tiny_model_cfg(name)).eval()
    _assert_folding_keeps_outputs(model, model.backbone)


def test_frozen_stages_and_norm_eval():
    backbone = TorchvisionBackbone("mobilenet_v2", frozen_stages=2, norm_eval=False)
    # Stride 2-8 blocks are features.0..6; features.7 starts stride 16.
    frozen = {n.split(".")[1] for n, p in backbone.body.named_parameters() if not p.requires_grad}
    assert frozen == {str(i) for i in range(7)}
    backbone.train()
    assert not backbone.body.get_submodule("features.6").training
    assert backbone.body.get_submodule("features.7").training
    backbone = TorchvisionBackbone("mobilenet_v2", frozen_stages=0, norm_eval=True).train()
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert all(p.requires_grad for p in backbone.parameters())


def test_torchvision_state_dict_file_reproduces_its_outputs(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v2().eval()
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(reference.state_dict(), path)
    backbone = build_backbone(50, 0, False, str(path), kind="torchvision", name="mobilenet_v2").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(backbone(x)[-1], reference.features(x), atol=1e-6)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError, match="do not fit torchvision mobilenet_v2"):
        TorchvisionBackbone("mobilenet_v2", pretrained=path)


def test_backbone_config_errors_are_clear():
    with pytest.raises(ValueError, match="not a torchvision classification model"):
        TorchvisionBackbone("mobilenet_v9")
    with pytest.raises(ValueError, match=r"needs model\.backbone\.name"):
        build_backbone(50, 1, False, kind="torchvision")
    with pytest.raises(ValueError, match="kind must be one of"):
        build_backbone(50, 1, False, kind="keras")


# sha256 (first 16 hex digits) of the newline-joined state-dict keys, computed before backbones became
# configurable: the ResNet presets (and their MMDetection parity) keep every parameter name.
RESNET_KEYS = {
    "retinanet_r50_nasfpn_crop640_50e": (903, "296e4ce22ed34688"),
    "retinanet_r50_fpn_crop640_50e": (566, "49d3a0771a401d71"),
    "nasfpn_tiny": (314, "7dd12a46e72a3c56"),  # since its trunk took the two-conv stem (stem_in.0, stem_in.1)
}


@pytest.mark.parametrize("preset", list(RESNET_KEYS))
def test_resnet_presets_keep_their_state_dict_keys(preset):
    with torch.device("meta"):
        model = build_model(PRESETS[preset].model, pretrained_backbone=False)
    keys = list(model.state_dict())
    assert (len(keys), hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]) == RESNET_KEYS[preset]


def test_resnet_widths_and_stem_shape_the_trunk():
    torch.manual_seed(0)
    backbone = build_backbone(10, 0, False, widths=(64, 128, 96, 80), stem="conv3x2").eval()
    assert backbone.out_channels == (128, 96, 80)
    assert isinstance(backbone.maxpool, torch.nn.Identity) and backbone.stem_in[0].stride == (2, 2)
    with torch.no_grad():
        feats = backbone(torch.randn(2, 3, 128, 128))
    assert [tuple(f.shape[1:]) for f in feats] == [(128, 16, 16), (96, 8, 8), (80, 4, 4)]
    # Initialised as torchvision's ResNet (kaiming normal, fan_out): conv std = sqrt(2 / fan_out).
    w = backbone.layer3[0].conv1.weight
    assert abs(w.std().item() - (2 / (96 * 9)) ** 0.5) < 0.005
    bottleneck = build_backbone(50, 0, False, widths=(16, 32, 64, 128))
    assert bottleneck.out_channels == (128, 256, 512)  # 4x the inner widths
    frozen = build_backbone(10, 1, False, stem="conv3x2")
    assert not any(p.requires_grad for p in frozen.stem_in.parameters())
    assert all(p.requires_grad for p in frozen.layer2.parameters())


def test_resnet_reshaped_detector_folds_its_batchnorm():
    torch.manual_seed(0)
    cfg = tiny_config().model
    cfg = replace(cfg, backbone=replace(cfg.backbone, widths=(32, 48, 48, 48), stem="conv3x2"))
    model = build_model(cfg).eval()
    _assert_folding_keeps_outputs(model, model)


def test_resnet_shape_errors_are_clear():
    with pytest.raises(ValueError, match="widths must be 4 channel counts"):
        build_backbone(10, 0, False, widths=(64, 128, 256))
    with pytest.raises(ValueError, match="stem must be one of"):
        build_backbone(10, 0, False, stem="conv5")
    with pytest.raises(ValueError, match="ImageNet weights fit ResNet's own widths"):
        build_backbone(18, 0, False, pretrained="torchvision", widths=(64, 128, 128, 128))


def test_mobilenet_preset_describes_itself(capsys):
    assert main(["info", "nasfpn_mobilenetv2", "--size", "128"]) == 0
    out = capsys.readouterr().out
    assert "backbone 2,223,872" in out


def test_two_training_steps_on_a_torchvision_backbone(tmp_path):
    data = synthetic_data(tmp_path / "data", num_train=4, num_val=2)
    cfg = tiny_config()
    cfg = replace(cfg, model=_tiny_model_cfg("mobilenet_v2"), data=replace(cfg.data, batch_size=2))
    cfg_file = tmp_path / "mnv2.yaml"
    cfg_file.write_text(config_to_yaml(replace(cfg, train=replace(cfg.train, epochs=1))))
    run = tmp_path / "run"
    assert main([*train_args(cfg_file, data, run), "--no-progress"]) == 0
    steps = [r for r in read_log(run) if "loss" in r]
    assert steps and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
