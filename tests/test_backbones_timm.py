"""timm trunks (``kind="timm"``): strides 8/16/32 from timm's feature_info, freezing, timm-layout weights, the
error without timm, BN folding of the inference fast path, and the ONNX export check of a torchvision and a timm
trunk. The timm tests are skipped where timm is not installed."""

from __future__ import annotations

import sys

import pytest
import torch

from deploy_helpers import fill_deterministic
from nasfpn.core.presets import get_config
from nasfpn.core.structures import ImageMeta
from nasfpn.deploy import export as ex
from nasfpn.deploy.check import sample_images
from nasfpn.deploy.fast import optimize_for_inference
from nasfpn.deploy.predictor import Detector
from nasfpn.models.backbone import build_backbone
from nasfpn.models.detector import build_model


@pytest.fixture
def timm():
    return pytest.importorskip("timm")


# name -> (out_indices, C3/C4/C5 modules, channels), as timm's feature_info gives them (timm 1.0.31).
EXPECTED = {
    "mobilenetv3_large_100": ((2, 3, 4), ("blocks.2", "blocks.4", "blocks.6"), (40, 112, 960)),
    "efficientnet_b0": ((2, 3, 4), ("blocks.2", "blocks.4", "blocks.6"), (40, 112, 320)),
    "resnet18": ((2, 3, 4), ("layer2", "layer3", "layer4"), (128, 256, 512)),
    # No stride-2 level: the levels are strides 4..32, so the indices shift.
    "convnext_atto": ((1, 2, 3), ("stages.1", "stages.2", "stages.3"), (80, 160, 320)),
}


def _timm_backbone(name: str, frozen_stages: int = 0, norm_eval: bool = False, pretrained=None):
    return build_backbone(50, frozen_stages, norm_eval, pretrained, kind="timm", name=name)


def _randomize_bn(model: torch.nn.Module) -> None:
    """Non-trivial BN statistics and affine, so that a wrong fold shows."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_timm_backbone_strides_and_channels(timm, name):
    indices, nodes, channels = EXPECTED[name]
    backbone = _timm_backbone(name).eval()
    assert backbone.out_indices == indices and backbone.return_nodes == nodes
    assert backbone.out_channels == channels and backbone.feature_strides == [8, 16, 32]
    with torch.no_grad():
        feats = backbone(torch.zeros(1, 3, 128, 128))
    assert [tuple(f.shape[1:]) for f in feats] == [(c, 128 // s, 128 // s) for c, s in zip(channels, (8, 16, 32))]


def test_timm_model_without_stride_8_16_32_is_refused(timm):
    with pytest.raises(ValueError, match="not all of"):
        _timm_backbone("vit_tiny_patch16_224")  # every level at stride 16
    with pytest.raises(ValueError, match="is not a timm model"):
        _timm_backbone("efficientnet_b99")
    with pytest.raises(ValueError, match=r"needs model\.backbone\.name"):
        build_backbone(50, 1, False, kind="timm")


def test_frozen_stages_take_no_gradient_and_stay_in_eval(timm):
    backbone = _timm_backbone("efficientnet_b0", frozen_stages=2)
    # Strides 2-8: conv_stem, bn1, blocks.0..2; blocks.3 starts stride 16.
    frozen = {
        n.split(".")[0] if n.startswith(("conv_stem", "bn1")) else ".".join(n.split(".")[:2])
        for n, p in backbone.body.named_parameters()
        if not p.requires_grad
    }
    assert frozen == {"conv_stem", "bn1", "blocks.0", "blocks.1", "blocks.2"}
    backbone.train()
    assert not backbone.body.get_submodule("blocks.2").training
    assert not any(m.training for m in backbone.body.get_submodule("blocks.2").modules())
    assert backbone.body.get_submodule("blocks.3").training
    running = backbone.body.bn1.running_mean.clone()
    feats = backbone(torch.randn(2, 3, 64, 64))
    sum(f.sum() for f in feats).backward()
    assert backbone.body.conv_stem.weight.grad is None and backbone.body.blocks[2][0].conv_pw.weight.grad is None
    assert backbone.body.blocks[3][0].conv_pw.weight.grad is not None
    assert torch.equal(backbone.body.bn1.running_mean, running)  # eval BN: statistics unchanged


def test_norm_eval_keeps_every_bn_in_eval(timm):
    backbone = _timm_backbone("resnet18", frozen_stages=0, norm_eval=True).train()
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert all(p.requires_grad for p in backbone.parameters())


@pytest.mark.parametrize("name", ["efficientnet_b0", "convnext_atto"])
def test_timm_layout_state_dict_loads_from_a_local_file(timm, name, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    reference = timm.create_model(name).eval()  # the classifier, in timm's layout (head included)
    _randomize_bn(reference)
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    backbone = _timm_backbone(name, pretrained=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = reference.forward_intermediates(x, indices=list(EXPECTED[name][0]), intermediates_only=True)
        got = backbone(x)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)


def test_weights_of_another_model_are_refused(timm, tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    with pytest.raises(ValueError, match="do not fit timm efficientnet_b0"):
        _timm_backbone("efficientnet_b0", pretrained=str(path))
    torch.save(timm.create_model("efficientnet_b1").state_dict(), path)  # same names, other shapes and depth
    with pytest.raises(ValueError, match="do not fit timm efficientnet_b0"):
        _timm_backbone("efficientnet_b0", pretrained=str(path))


def test_timm_pretrained_offline_says_what_to_do(timm, monkeypatch, tmp_path):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no network in tests: fail at once
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # and nothing cached
    with pytest.raises(RuntimeError, match=r"(?s)timm could not fetch.*pretrained to its path"):
        _timm_backbone("efficientnet_b0", pretrained="timm")


def test_without_timm_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "nasfpn\[timm\]"'):
        build_backbone(50, 1, False, kind="timm", name="efficientnet_b0")


# --------------------------------------------------------------------------- inference fast path


def _tiny_detector_config(kind: str, name: str, size: int = 128):
    """nasfpn_mobilenetv2 shrunk: one 32-channel NAS-FPN stack, one head conv, ``size`` px."""
    return get_config(
        "nasfpn_mobilenetv2",
        [
            f"model.backbone.kind={kind}",
            f"model.backbone.name={name}",
            "model.backbone.pretrained=null",
            "model.backbone.frozen_stages=0",
            "model.neck.stacks=1",
            "model.neck.channels=32",
            "model.head.feat_channels=32",
            "model.head.stacked_convs=1",
            f"data.image_size={size}",
        ],
    )


def _assert_fast_path_matches(model, x: torch.Tensor) -> None:
    fast = optimize_for_inference(model, fuse_bn=True, channels_last=False)
    with torch.no_grad():
        plain, folded = model(x), fast(x)
    for a, b in zip(plain[0] + plain[1], folded[0] + folded[1]):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    h, w = x.shape[-2:]
    metas = [ImageMeta(ori_shape=(h, w), img_shape=(h, w), pad_shape=(h, w), scale_factor=(1.0, 1.0))] * len(x)
    want, got = model.postprocess(plain, metas), fast.postprocess(folded, metas)
    for d0, d1 in zip(want, got):
        assert len(d0["labels"]) > 0 and torch.equal(d0["labels"], d1["labels"])
        assert torch.allclose(d0["boxes"], d1["boxes"], atol=1e-3) and torch.allclose(
            d0["scores"], d1["scores"], atol=1e-5
        )


def test_fast_path_folds_a_timm_trunks_batchnorm(timm):
    torch.manual_seed(0)
    model = fill_deterministic(build_model(_tiny_detector_config("timm", "mobilenetv3_large_100").model), cls_bias=-2.0)
    _randomize_bn(model.backbone)
    fast = optimize_for_inference(model, fuse_bn=True, channels_last=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    _assert_fast_path_matches(model, torch.randn(1, 3, 128, 128))


def test_fast_path_keeps_the_batchnorm_it_cannot_fold(timm):
    torch.manual_seed(0)
    # Pre-activation ResNet: norm1 comes before its conv, so it stays; norm2 follows conv1 and folds.
    model = fill_deterministic(build_model(_tiny_detector_config("timm", "resnetv2_18").model), cls_bias=-2.0)
    _randomize_bn(model.backbone)
    kept = build_model(_tiny_detector_config("timm", "resnetv2_18").model).backbone.eval().fold_batchnorm()
    assert kept and all(n.endswith("norm1") for n in kept)
    _assert_fast_path_matches(model, torch.randn(1, 3, 128, 128))


def test_fast_path_keeps_the_batchnorm_of_an_untraceable_trunk(timm, monkeypatch):
    """A trunk torch.fx cannot trace keeps every BN, and the fast path still runs and agrees."""
    from nasfpn.models import backbones_timm

    def untraceable(self, root, concrete_args=None):
        raise torch.fx.proxy.TraceError("not traceable")

    monkeypatch.setattr(backbones_timm._LeafTracer, "trace", untraceable)
    model = fill_deterministic(build_model(_tiny_detector_config("timm", "efficientnet_b0").model), cls_bias=-2.0)
    _randomize_bn(model.backbone)
    fast = optimize_for_inference(model, fuse_bn=True, channels_last=False)
    left = [n for n, m in fast.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert left and all(n.startswith("backbone.body.") for n in left)
    _assert_fast_path_matches(model, torch.randn(1, 3, 128, 128))


# --------------------------------------------------------------------------- ONNX export check


def _export_and_check(kind: str, name: str, tmp_path) -> ex.ParityReport:
    cfg = _tiny_detector_config(kind, name)
    model = fill_deterministic(build_model(cfg.model, pretrained_backbone=False), cls_bias=-2.0)
    images = sample_images(cfg, 1)  # one picture: the check's cost is mostly the export itself
    _, report = ex.export(Detector(model, cfg, optimize=False), tmp_path / f"{name}.onnx", images=images)
    assert report is not None and report.ok and report.eager_detections > 0, report.summary()
    return report


@pytest.mark.slow  # ~6 s each; the Lite export test (test_lite.py) stays in the default run
def test_onnx_export_check_of_a_torchvision_trunk(tmp_path):
    pytest.importorskip("onnxruntime")
    _export_and_check("torchvision", "mobilenet_v2", tmp_path)


@pytest.mark.slow  # ~6 s each; the Lite export test (test_lite.py) stays in the default run
def test_onnx_export_check_of_a_timm_trunk(timm, tmp_path):
    pytest.importorskip("onnxruntime")
    _export_and_check("timm", "mobilenetv3_large_100", tmp_path)
