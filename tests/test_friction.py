"""Everyday use: the inputs ``predict`` takes, ``--device`` of every command, eval on malformed
annotations, weights of another model, ``info --weights`` and the lr milestones following the epochs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nasfpn
from nasfpn.cli import main
from nasfpn.core.device import DeviceError, parse_device
from nasfpn.deploy.predictor import export_weights
from nasfpn.models import build_model


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """nasfpn_tiny with 3 named classes (as trained on a 3-class dataset), many detections per image."""
    cfg = nasfpn.get_config(
        "nasfpn_tiny",
        [
            "model.head.num_classes=3",
            "model.head.prior_prob=0.3",
            "data.class_names=[disk,square,star]",
            "data.category_ids=[2,4,9]",
        ],
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny3.safetensors"
    export_weights(build_model(cfg.model, pretrained_backbone=False), cfg, path)
    return path


@pytest.fixture(scope="module")
def detector(weights):
    return nasfpn.load(weights=weights)


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
