"""Configs: presets carry MMDetection's values; files and --set overrides refine them with type checks."""

from __future__ import annotations

import pytest

from nasfpn.cli import main
from nasfpn.core.config import Config, apply_overrides, config_from_dict, config_to_dict
from nasfpn.core.presets import PRESETS, get_config


def test_seed_presets_carry_mmdetection_values():
    nas = PRESETS["retinanet_r50_nasfpn_crop640_50e"]
    fpn = PRESETS["retinanet_r50_fpn_crop640_50e"]
    assert nas.data.pad_divisor == 128 and fpn.data.pad_divisor == 64
    for cfg in (nas, fpn):
        m, t = cfg.model, cfg.train
        assert (m.backbone.depth, m.backbone.frozen_stages, m.backbone.norm_eval) == (50, 1, False)
        assert (m.loss.pos_iou_thr, m.loss.neg_iou_thr, m.loss.min_pos_iou) == (0.5, 0.5, 0.0)
        assert (m.loss.focal_alpha, m.loss.focal_gamma) == (0.25, 2.0)
        assert (m.test.score_thr, m.test.nms_pre, m.test.nms_iou, m.test.max_per_img) == (0.05, 1000, 0.5, 100)
        assert (t.base_lr, t.base_batch_size, t.momentum, t.weight_decay, t.norm_weight_decay) == (0.08, 64, 0.9, 1e-4, 0.0)
        assert (t.warmup_iters, t.warmup_ratio, t.milestones, t.gamma, t.epochs) == (1000, 0.1, (30, 40), 0.1, 50)
        assert (cfg.data.image_size, cfg.data.scale_range, cfg.data.flip_prob) == (640, (0.8, 1.2), 0.5)
        assert m.head.separate_bn and m.anchors.strides == (8, 16, 32, 64, 128)
    assert (nas.model.neck.kind, nas.model.neck.stacks, nas.model.neck.channels) == ("nasfpn", 7, 256)
    assert fpn.model.neck.kind == "fpn"


def test_scaled_family_overrides_only_scale():
    big = PRESETS["retinanet_r50_nasfpn_7x384_1280"]
    base = PRESETS["retinanet_r50_nasfpn_crop640_50e"]
    assert (big.model.neck.stacks, big.model.neck.channels, big.data.image_size) == (7, 384, 1280)
    assert big.train == base.train and big.model.loss == base.model.loss


def test_overrides_are_typed_and_checked(tmp_path):
    cfg = get_config("retinanet_r50_nasfpn_crop640_50e", ["train.epochs=12", "model.neck.stacks=3",
                                                          "data.scale_range=[0.5, 1.5]", "train.amp=bf16"])
    assert cfg.train.epochs == 12 and cfg.model.neck.stacks == 3 and cfg.data.scale_range == (0.5, 1.5)
    with pytest.raises(ValueError, match="unknown key"):
        get_config("nasfpn_tiny", ["train.epoch=3"])
    with pytest.raises(ValueError, match="expected an integer"):
        get_config("nasfpn_tiny", ["train.epochs=many"])
    with pytest.raises(ValueError, match="unknown model"):
        get_config("retinanet_r51")
    user = tmp_path / "user.yaml"
    user.write_text("train:\n  base_lr: 0.01\nmodel:\n  head:\n    num_classes: 3\n")
    cfg = get_config("nasfpn_tiny", ["train.base_lr=0.02"], user)
    assert cfg.train.base_lr == 0.02 and cfg.model.head.num_classes == 3  # --set wins over the file


def test_round_trip_through_dict_and_yaml_file(tmp_path, capsys):
    for cfg in PRESETS.values():
        assert config_from_dict(config_to_dict(cfg)) == cfg
    assert main(["config", "retinanet_r50_nasfpn_crop640_50e", "--set", "train.epochs=7"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    cfg = get_config(str(path))
    assert cfg.train.epochs == 7 and cfg.name == "retinanet_r50_nasfpn_crop640_50e"
    assert apply_overrides(Config(), []) == Config()


def test_info_reports_the_reference_parameter_counts(capsys):
    import json

    for name, total, neck in (("retinanet_r50_nasfpn_crop640_50e", 59_979_828, 29_990_144),
                              ("retinanet_r50_fpn_crop640_50e", 37_988_404, 7_998_720)):
        assert main(["info", name, "--json", "--size", "128"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["params_total"] == total and info["params_neck"] == neck
        assert info["params_backbone"] == 23_508_032 and info["params_head"] == 6_481_652
        assert info["anchors"] == 9 * (16 * 16 + 8 * 8 + 4 * 4 + 2 * 2 + 1)
