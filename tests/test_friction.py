"""Everyday use: the inputs ``predict`` takes, ``--device`` of every command, eval on malformed
annotations, weights of another model, ``info --weights`` and the lr milestones following the epochs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nasfpn
from nasfpn.cli import main
from nasfpn.core.device import DeviceError, parse_device
from nasfpn.core.weights import read_weights
from nasfpn.deploy.predictor import export_weights
from nasfpn.models import build_model


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """nasfpn_tiny with 3 named classes, as trained on a 3-class dataset."""
    cfg = nasfpn.get_config(
        "nasfpn_tiny",
        [
            "model.head.num_classes=3",
            "data.class_names=[disk,square,star]",
            "data.category_ids=[2,4,9]",
        ],
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny3.safetensors"
    export_weights(build_model(cfg.model, pretrained_backbone=False), cfg, path)
    return path


@pytest.fixture(scope="module")
def detector():
    """Many detections per image (prior 0.3), few NMS candidates (top 50 per level): fast to run."""
    overrides = ["model.head.num_classes=3", "model.head.prior_prob=0.3", "model.test.nms_pre=50"]
    cfg = nasfpn.get_config("nasfpn_tiny", overrides)
    torch.manual_seed(0)
    return nasfpn.Detector(build_model(cfg.model, pretrained_backbone=False), cfg)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# --------------------------------------------------------------------------- predict inputs
def test_predict_takes_paths_pil_arrays_and_tensors_one_or_a_list(detector, tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(rgb).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # np.asarray(PIL image) is read-only: no "not writable" warning
        readonly = np.asarray(Image.open(path))
        assert not readonly.flags.writeable
        ref = detector.predict(rgb)
        assert isinstance(ref, dict) and len(ref["boxes"]) > 0
        hwc = torch.from_numpy(rgb.copy())
        for one in (str(path), path, Image.open(path), readonly, hwc, hwc.permute(2, 0, 1), hwc.float() / 255):
            _same(detector(one), ref)
        many = detector.predict([path, readonly, Image.open(path)], batch_size=1)
    assert isinstance(many, list) and len(many) == 3
    for got in many:
        _same(got, ref)
    assert len(detector((rgb,))) == 1  # a tuple is a list of images too
    with pytest.raises(ValueError, match="image 1: a 4-D array"):
        detector([rgb, rgb[None]])
    with pytest.raises(ValueError, match="image 0: expected a file path, a PIL image"):
        detector(3)
    with pytest.raises(ValueError, match=r"missing\.png: no such file"):
        detector(tmp_path / "missing.png")


def test_onnx_predict_takes_the_same_inputs(detector, tmp_path):
    from nasfpn.deploy.onnx_runtime import OnnxDetector

    rgb = np.random.default_rng(1).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    path = tmp_path / "b.png"
    Image.fromarray(rgb).save(path)

    class Runtime(OnnxDetector):  # the input handling only, without an exported file
        def __init__(self, det) -> None:
            self.config, self.category_ids, self.input_hw, self.min_side, self.batch = (
                det.config,
                det.category_ids,
                (128, 128),
                0,
                None,
            )
            self.contract, self.seen = "end2end", []

        def _run_end2end(self, batch, info, score_thr):
            self.seen.append(batch)
            return [{k: np.zeros((0, 4) if k == "boxes" else 0) for k in ("boxes", "scores", "labels")}] * len(batch)

    runtime = Runtime(detector)
    assert isinstance(runtime(Image.open(path)), dict)
    assert isinstance(runtime([str(path), np.asarray(Image.open(path))]), list)
    np.testing.assert_array_equal(runtime.seen[0][0], runtime.seen[1][1])


# --------------------------------------------------------------------------- devices
def test_one_device_parser():
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device(" CPU ") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert parse_device(None) == torch.device("cpu")
        for text in ("cuda", "cuda:0", "0", "1"):
            with pytest.raises(DeviceError, match=rf"^device '{text}': no CUDA device is available .*device='cpu'$"):
                parse_device(text)
    with pytest.raises(DeviceError, match=r"--device gpu: not a device; use cpu, cuda, cuda:N"):
        parse_device("gpu", "--device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "-", "--weights", "w.safetensors", "img.jpg", "--out", "o"],
        ["eval", "-", "--weights", "w.safetensors", "--data", "d"],
        ["train", "nasfpn_tiny", "--data", "d", "--out", "o"],
        ["serve", "-", "--weights", "w.safetensors"],
        ["bench", "nasfpn_tiny"],
        ["demo", "--out", "o"],
    ],
)
def test_every_command_says_when_its_device_is_absent(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for device in ("cuda", "cuda:1", "1"):
        assert main([*argv, "--device", device]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [err[0]] and err[0].startswith(f"error: --device {device}: no CUDA device is available")
        assert err[0].endswith("; use --device cpu")
    assert main([*argv, "--device", "tpu0"]) == 2
    assert "error: --device tpu0: not a device; use cpu, cuda, cuda:N" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing was started


def test_python_api_checks_the_device(weights):
    with pytest.raises(ValueError, match="device 'gpu': not a device"):
        nasfpn.load(weights=weights, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda': no CUDA device is available"):
            nasfpn.load(weights=weights, device="cuda")


# --------------------------------------------------------------------------- eval on malformed ground truth
def _ground_truth(path: Path, annotations: list[dict]) -> Path:
    path.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
                "categories": [{"id": i, "name": n} for i, n in ((2, "disk"), (4, "square"), (9, "star"))],
                "annotations": annotations,
            }
        )
    )
    return path


def test_eval_names_malformed_annotations_before_any_inference(weights, tmp_path, capsys, monkeypatch):
    import nasfpn.apps.evaluate as app

    ok = {"id": 1, "image_id": 1, "category_id": 2, "bbox": [1, 2, 10, 10], "area": 100, "iscrowd": 0}
    bad = _ground_truth(
        tmp_path / "bad.json",
        [
            ok,
            {k: v for k, v in {**ok, "id": 2}.items() if k != "bbox"},
            {**ok, "id": 3, "bbox": [1, 2, 3]},
            {**ok, "id": 4, "category_id": 99},
        ],
    )
    monkeypatch.setattr(app, "load", lambda *a, **k: pytest.fail("weights loaded before the ground truth was checked"))
    assert main(["eval", "-", "--weights", str(weights), "--val-ann", str(bad), "--val-images", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: 3 error(s) in the ground truth, nothing evaluated")
    assert "annotations[1] lacks ['bbox'] (file a.png, image id 1, annotation id 2)" in err
    assert "bbox [1, 2, 3] is not 4 finite numbers" in err and "annotation id 3" in err
    assert "category id 99 is not in 'categories'" in err and "annotation id 4" in err
    assert f"`nasfpn check-data {bad} {tmp_path}`" in err and "Traceback" not in err
    results = tmp_path / "results.json"
    results.write_text("[]")
    assert main(["eval", "--ann", str(bad), "--results", str(results)]) == 2
    assert "annotations[1] lacks ['bbox']" in capsys.readouterr().err


# --------------------------------------------------------------------------- weights of another model
def test_weights_of_another_config_say_what_they_were_made_for(weights, tmp_path, capsys):
    gt = _ground_truth(tmp_path / "gt.json", [])
    argv = ["--weights", str(weights), "--val-ann", str(gt), "--val-images", str(tmp_path)]
    assert main(["eval", "retinanet_r50_fpn_crop640_50e", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: weights {weights} were made for config 'nasfpn_tiny', not 'retinanet_r50_fpn_crop640_50e' "
        "(it differs in model.backbone.depth 50 (file: 10),"
    )
    assert f"Name the model as '-' (e.g. `nasfpn eval - --weights {weights}`" in err and "wrong shape" in err


def test_a_named_preset_takes_the_classes_of_the_file(weights, tmp_path, capsys):
    det = nasfpn.load("nasfpn_tiny", weights=weights)  # the preset has 80 classes, the file 3
    assert (det.config.name, det.config.model.head.num_classes) == ("nasfpn_tiny", 3)
    assert det.class_names == ("disk", "square", "star") and det.category_ids == (2, 4, 9)
    assert det.config.data.image_size == 128  # the rest is the preset's
    with pytest.raises(ValueError, match=r"do not fit their own config 'nasfpn_tiny'.*model\.head\.num_classes 80"):
        nasfpn.load("-", weights=weights, overrides=["model.head.num_classes=80"])  # given explicitly: it wins
    gt = _ground_truth(tmp_path / "gt.json", [{"id": 1, "image_id": 1, "category_id": 4, "bbox": [8, 8, 20, 20]}])
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.png")
    argv = ["--weights", str(weights), "--val-ann", str(gt), "--val-images", str(tmp_path), "--no-progress"]
    assert main(["eval", "nasfpn_tiny", *argv]) == 0
    assert "square" in capsys.readouterr().out  # the per-class table names the file's classes


# --------------------------------------------------------------------------- info --weights
def test_info_describes_a_weights_file(weights, tmp_path, capsys):
    assert main(["info", "--weights", str(weights)]) == 0
    out = capsys.readouterr().out
    assert "model            nasfpn_tiny" in out and "parameters       " in out and "FLOPs" in out
    assert f"weights          {weights}: nasfpn, " in out and "made for         config nasfpn_tiny" in out
    assert "classes          3: disk (id 2), square (id 4), star (id 9)" in out
    assert "training         not recorded in this file" in out
    state, cfg_dict, _ = read_weights(weights)
    ckpt = tmp_path / "last.pt"
    torch.save(
        {"model": state, "config": cfg_dict, "epoch": 5, "step": 50, "best": {"AP": 0.25, "AP50": 0.5, "epoch": 4}},
        ckpt,
    )
    assert main(["info", "nasfpn_tiny", "--weights", str(ckpt)]) == 0  # a named preset: the file's classes
    out = capsys.readouterr().out
    assert "training         epoch 5; step 50; best AP 0.2500, AP50 0.5000 (epoch 4)" in out
    assert "classes          3: disk" in out
    assert main(["info", "-", "--weights", str(ckpt), "--json"]) == 0
    carried = json.loads(capsys.readouterr().out)["weights"]
    assert (carried["kind"], carried["config"], carried["num_classes"], carried["epoch"]) == (
        "checkpoint",
        "nasfpn_tiny",
        3,
        5,
    )
    assert main(["info"]) == 2
    assert "error: no config: name a preset" in capsys.readouterr().err


# --------------------------------------------------------------------------- lr milestones follow the epochs
def test_milestones_move_with_the_epochs(tmp_path):
    from nasfpn import cli
    from nasfpn.core.config import scale_milestones

    assert scale_milestones((19, 22), 24, 60) == (48, 55)
    assert scale_milestones((19, 22), 24, 16) == (13, 15)
    assert scale_milestones((19, 22), 24, 2) == (1,)
    assert scale_milestones((19, 22), 24, 1) == ()
    assert scale_milestones((30, 60), 50, 100) == (60,)  # 60 never applied in 50 epochs
    tiny = nasfpn.get_config("nasfpn_tiny")
    assert (tiny.train.epochs, tiny.train.milestones) == (24, (19, 22))
    assert nasfpn.get_config("nasfpn_tiny", ["train.epochs=60"]).train.milestones == (48, 55)
    assert nasfpn.get_config("nasfpn_tiny", ["train.epochs=60", "train.milestones=[40,50]"]).train.milestones == (
        40,
        50,
    )
    assert nasfpn.get_config("nasfpn_tiny", ["train.milestones=[40,50]", "train.epochs=60"]).train.milestones == (
        40,
        50,
    )
    assert nasfpn.get_config("nasfpn_tiny", ["train.base_lr=0.1"]).train.milestones == (19, 22)
    user = tmp_path / "user.yaml"
    user.write_text("train:\n  epochs: 12\n")
    assert nasfpn.get_config("nasfpn_tiny", file=user).train.milestones == (10, 11)
    assert nasfpn.get_config(str(user)).train.milestones == (7, 10)  # Config()'s 30, 40 of 50
    parse = cli.build_parser().parse_args
    for flags in (["--epochs", "60"], ["--set", "train.epochs=60"]):
        cfg = cli._train_config(parse(["train", "nasfpn_tiny", "--data", "d", "--out", str(tmp_path), *flags]))
        assert (cfg.train.epochs, cfg.train.milestones) == (60, (48, 55))
    explicit = ["--set", "train.milestones=[30]", "--epochs", "60"]
    cfg = cli._train_config(parse(["train", "nasfpn_tiny", "--data", "d", "--out", str(tmp_path), *explicit]))
    assert cfg.train.milestones == (30,)
