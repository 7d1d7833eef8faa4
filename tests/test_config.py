"""Configs: presets carry MMDetection's values; files and --set overrides refine them with type checks."""

from __future__ import annotations

import re

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
        assert (t.base_lr, t.base_batch_size, t.momentum, t.weight_decay, t.norm_weight_decay) == (
            0.08,
            64,
            0.9,
            1e-4,
            0.0,
        )
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
    cfg = get_config(
        "retinanet_r50_nasfpn_crop640_50e",
        ["train.epochs=12", "model.neck.stacks=3", "data.scale_range=[0.5, 1.5]", "train.amp=bf16"],
    )
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

    for name, total, neck in (
        ("retinanet_r50_nasfpn_crop640_50e", 59_979_828, 29_990_144),
        ("retinanet_r50_fpn_crop640_50e", 37_988_404, 7_998_720),
    ):
        assert main(["info", name, "--json", "--size", "128"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["params_total"] == total and info["params_neck"] == neck
        assert info["params_backbone"] == 23_508_032 and info["params_head"] == 6_481_652
        assert info["anchors"] == 9 * (16 * 16 + 8 * 8 + 4 * 4 + 2 * 2 + 1)


def test_resolve_config_is_one_rule_for_names_files_and_carried_configs(tmp_path):
    from dataclasses import replace

    from nasfpn.core.presets import resolve_config

    user = tmp_path / "user.yaml"
    user.write_text("train:\n  base_lr: 0.01\n")
    named = resolve_config("nasfpn_tiny", ["train.epochs=3"], user)
    assert named == get_config("nasfpn_tiny", ["train.epochs=3"], user)
    assert (named.train.epochs, named.train.base_lr) == (3, 0.01)
    carried = config_to_dict(replace(PRESETS["nasfpn_tiny"], name="from_weights"))
    for model in (None, "-"):
        cfg = resolve_config(model, ["train.epochs=3"], user, file_config=carried)
        assert (cfg.name, cfg.train.epochs, cfg.train.base_lr) == ("from_weights", 3, 0.01)
    # A named config wins over the carried one; a Config is kept as it is unless refined.
    assert resolve_config("nasfpn_tiny", file_config=carried).name == "nasfpn_tiny"
    given = PRESETS["retinanet_r50_fpn_crop640_50e"]
    assert resolve_config(given, file_config=carried) is given
    assert resolve_config(given, ["train.epochs=2"]).train.epochs == 2
    for model in (None, "-"):
        with pytest.raises(ValueError, match=r"name a preset .* or pass weights that carry their config"):
            resolve_config(model)


def test_config_files_are_read_by_one_reader_with_one_kind_of_error(tmp_path):
    from nasfpn.core.presets import resolve_config

    bad = {
        "missing.yaml": None,
        "broken.yaml": "train: [1, 2\n",
        "list.yaml": "- 1\n- 2\n",
        "typo.yaml": "train:\n  epoch: 3\n",
    }
    expected = {
        "missing.yaml": "does not exist",
        "broken.yaml": "not valid YAML",
        "list.yaml": "mapping at top level",
        "typo.yaml": "unknown key",
    }
    for name, text in bad.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        # The same message whether the file is the model or refines a preset.
        for model, config_file in ((str(path), None), ("nasfpn_tiny", path)):
            with pytest.raises(ValueError, match=f"^config file {re.escape(str(path))}: .*{expected[name]}"):
                resolve_config(model, config_file=config_file)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert resolve_config("nasfpn_tiny", config_file=empty) == PRESETS["nasfpn_tiny"]
    assert resolve_config(str(empty)) == Config()


def test_default_labels_are_one_rule_for_predict_and_eval():
    from dataclasses import replace

    from nasfpn.core.classes import COCO_CATEGORY_IDS, COCO_CLASSES, label_category_ids, label_names
    from nasfpn.deploy.predictor import load

    assert label_category_ids(3, (2, 4, 9)) == (2, 4, 9) and label_names(3, ("a", "b", "c")) == ("a", "b", "c")
    assert label_category_ids(80) == COCO_CATEGORY_IDS and label_names(80) == COCO_CLASSES
    assert label_category_ids(3) == (1, 2, 3) and label_names(3) == ("class_0", "class_1", "class_2")
    tiny = PRESETS["nasfpn_tiny"]
    det = load(replace(tiny, model=replace(tiny.model, head=replace(tiny.model.head, num_classes=3))))
    assert det.category_ids == (1, 2, 3) and det.class_names == ("class_0", "class_1", "class_2")


def test_training_crop_is_its_own_setting_defaulting_to_the_test_size():
    from nasfpn.data.collate import train_collate

    cfg = PRESETS["retinanet_r50_nasfpn_crop640_50e"]
    assert cfg.data.crop_size is None and cfg.data.train_crop == cfg.data.image_size == 640
    smaller = apply_overrides(cfg, ["data.crop_size=512"])
    assert smaller.data.train_crop == 512 and smaller.data.image_size == 640
    # Configs saved before the setting existed read as before.
    data = config_to_dict(cfg)
    del data["data"]["crop_size"]
    assert config_from_dict(data).data.train_crop == 640
    # The training collate pads to the crop.
    import torch

    sample = {
        "image": torch.zeros(3, 100, 80, dtype=torch.uint8),
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.long),
        "image_id": 1,
    }
    images, _ = train_collate(smaller.data)([sample])
    assert tuple(images.shape[-2:]) == (512, 512)
