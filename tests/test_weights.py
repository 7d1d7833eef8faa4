"""Weights I/O: our safetensors format, MMDetection checkpoints, refusal of unsafe or unfitting files."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import nasfpn
from mmdet_reference import to_mmdet_keys
from nasfpn.cli import main
from nasfpn.core.mmdet import convert_state_dict, rename_key
from nasfpn.core.presets import PRESETS
from nasfpn.core.weights import WeightsError, read_weights, save_safetensors
from nasfpn.models import build_model


def _tiny_cfg():
    cfg = PRESETS["nasfpn_tiny"]
    return replace(
        cfg,
        model=replace(cfg.model, head=replace(cfg.model.head, num_classes=3)),
        data=replace(cfg.data, image_size=128, class_names=("a", "b", "c"), category_ids=(1, 3, 7)),
    )


def test_rename_table_is_one_to_one_and_total(reference_dir):
    for short, name in (
        ("r50_fpn", "retinanet_r50_fpn_crop640_50e"),
        ("r50_nasfpn", "retinanet_r50_nasfpn_crop640_50e"),
    ):
        spec = json.loads((reference_dir / f"mmdet_keys_{short}.json").read_text())
        model_keys = list(build_model(PRESETS[name].model, pretrained_backbone=False).state_dict())
        mapped = {rename_key(k["name"]) for k in spec["keys"]}
        assert None not in mapped
        assert mapped == set(model_keys)
        tied = sum(len(g) - 1 for g in spec["tied_groups"])
        assert len(spec["keys"]) - tied == len(model_keys)


def test_safetensors_round_trip_carries_config(tmp_path):
    cfg = _tiny_cfg()
    model = build_model(cfg.model, pretrained_backbone=False)
    path = tmp_path / "m.safetensors"
    nasfpn.deploy.predictor.export_weights(model, cfg, path)
    det = nasfpn.load(weights=path)  # no config given: the file carries it
    assert det.config == cfg
    assert det.class_names == ("a", "b", "c") and det.category_ids == (1, 3, 7)
    for k, v in model.state_dict().items():
        assert torch.equal(det.model.state_dict()[k], v), k


def test_mmdet_checkpoint_is_detected_and_converted(tmp_path):
    cfg = _tiny_cfg()
    model = build_model(cfg.model, pretrained_backbone=False)
    path = tmp_path / "mmdet.pth"
    torch.save({"state_dict": to_mmdet_keys(model.state_dict()), "meta": {"mmdet_version": "3.3.0", "epoch": 50}}, path)
    _state, config, kind = read_weights(path)
    assert kind == "mmdet" and config is None
    det = nasfpn.load(cfg, weights=path)
    for k, v in model.state_dict().items():
        assert torch.equal(det.model.state_dict()[k], v), k
    # The CLI converts it into our format, which then loads without a config.
    out = tmp_path / "converted.safetensors"
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(nasfpn.core.config.config_to_yaml(cfg))
    assert main(["convert", str(path), str(out), "--model", str(cfg_file)]) == 0
    assert nasfpn.load(weights=out).config == cfg


def test_inconsistent_shared_conv_aliases_are_refused():
    cfg = _tiny_cfg()
    state = to_mmdet_keys(build_model(cfg.model, pretrained_backbone=False).state_dict())
    state["bbox_head.cls_convs.3.0.conv.weight"] = state["bbox_head.cls_convs.3.0.conv.weight"] + 1
    with pytest.raises(ValueError, match="aliases of one shared conv"):
        convert_state_dict(state)


def test_wrong_model_reports_missing_unexpected_and_misshaped(tmp_path):
    cfg = _tiny_cfg()
    path = tmp_path / "m.safetensors"
    nasfpn.deploy.predictor.export_weights(build_model(cfg.model, pretrained_backbone=False), cfg, path)
    other = replace(cfg, model=replace(cfg.model, neck=replace(cfg.model.neck, stacks=3)))
    # A named config takes the file's classes unless told otherwise, as here.
    with pytest.raises(WeightsError) as err:
        nasfpn.load(
            other, weights=path, overrides=["model.head.num_classes=4", "data.class_names=[]", "data.category_ids=[]"]
        )
    text = str(err.value)
    assert "model.neck.stacks 3 (file: 2)" in text and "model.head.num_classes 4 (file: " in text
    assert "missing (" in text and "fpn_stages.2" in text
    assert "wrong shape (" in text and "head.retina_cls.weight" in text
    with pytest.raises(WeightsError, match="unexpected"):
        nasfpn.load(replace(cfg, model=replace(cfg.model, neck=replace(cfg.model.neck, stacks=1))), weights=path)


def test_a_named_config_at_another_input_size_than_the_weights_is_said(tmp_path, caplog):
    cfg = replace(_tiny_cfg(), data=replace(_tiny_cfg().data, image_size=256))
    path = tmp_path / "m.safetensors"
    nasfpn.deploy.predictor.export_weights(build_model(cfg.model, pretrained_backbone=False), cfg, path)
    with caplog.at_level("WARNING", logger="nasfpn.deploy.predictor"):
        assert nasfpn.load("nasfpn_tiny", weights=path, optimize=False).config.data.image_size == 128
    assert "trained at 256 px input, the config given says 128 px: predicting at 128" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="nasfpn.deploy.predictor"):
        assert nasfpn.load("-", weights=path, optimize=False).config.data.image_size == 256
        nasfpn.load("nasfpn_tiny", weights=path, optimize=False, overrides=["data.image_size=192"])
    assert "trained at" not in caplog.text  # the file's config, or a size set on purpose


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_code_is_refused(tmp_path):
    legacy = tmp_path / "legacy.pth"
    with open(legacy, "wb") as f:
        pickle.dump({"state_dict": {"w": torch.zeros(1)}, "x": _Payload()}, f)
    with pytest.raises(WeightsError, match=r"refusing to load .*system"):
        read_weights(legacy)
    path = tmp_path / "evil.pth"  # a real checkpoint with a payload slipped into it
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload()}, path)
    with pytest.raises(WeightsError, match=r"refusing to load .*system"):
        read_weights(path)
    # And from the command line: a clear message and a non-zero exit, no traceback.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nasfpn",
            "convert",
            str(path),
            str(tmp_path / "o.safetensors"),
            "--model",
            "nasfpn_tiny",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "refusing to load" in proc.stderr and "Traceback" not in proc.stderr


def test_non_checkpoint_files_get_a_clear_error(tmp_path):
    junk = tmp_path / "notes.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint"):
        read_weights(junk)
    with pytest.raises(WeightsError, match="does not exist"):
        read_weights(tmp_path / "missing.safetensors")
    lst = tmp_path / "list.pth"
    torch.save([1, 2, 3], lst)
    with pytest.raises(WeightsError, match="not a checkpoint dict"):
        read_weights(lst)


def test_url_weights_are_downloaded_once_to_the_cache(tmp_path, monkeypatch):
    cfg = _tiny_cfg()
    src = tmp_path / "served.safetensors"
    save_safetensors(
        build_model(cfg.model, pretrained_backbone=False).state_dict(), src, nasfpn.core.config.config_to_dict(cfg)
    )
    calls = []

    def fake_download(url, dst, progress=True):
        calls.append(url)
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            fo.write(fi.read())

    monkeypatch.setenv("NASFPN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    url = "https://example.invalid/models/tiny.safetensors"
    assert nasfpn.load(weights=url).config == cfg
    assert nasfpn.load(weights=url).config == cfg
    assert calls == [url]
