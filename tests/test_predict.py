"""`nasfpn predict` and the Python API on image files, including unreadable ones."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import nasfpn
from nasfpn.core.presets import PRESETS
from nasfpn.deploy.predictor import export_weights
from nasfpn.models import build_model


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    cfg = PRESETS["nasfpn_tiny"]
    cfg = replace(
        cfg,
        model=replace(cfg.model, head=replace(cfg.model.head, num_classes=3, prior_prob=0.3)),
        data=replace(cfg.data, image_size=128, class_names=("disk", "square", "star"), category_ids=(2, 4, 9)),
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    export_weights(build_model(cfg.model, pretrained_backbone=False), cfg, path)
    return path, cfg


def _images(folder):
    rng = np.random.default_rng(0)
    folder.mkdir()
    Image.fromarray(rng.integers(0, 255, (100, 150, 3), dtype=np.uint8)).save(folder / "a_rgb.png")
    Image.fromarray(rng.integers(0, 255, (90, 60), dtype=np.uint8), mode="L").save(folder / "b_gray.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 4), dtype=np.uint8), mode="RGBA").save(folder / "c_rgba.png")
    (folder / "d_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8)).save(folder / "e_last.jpg")


def test_predict_skips_unreadable_files_and_exits_nonzero(tmp_path, tiny_weights):
    weights, _ = tiny_weights
    _images(tmp_path / "imgs")
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nasfpn",
            "predict",
            "-",
            str(tmp_path / "imgs"),
            "--weights",
            str(weights),
            "--out",
            str(out),
            "--score-thr",
            "0.2",
            "--vis-thr",
            "0.2",
            "--batch-size",
            "2",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stderr
    assert "d_corrupt.jpg" in proc.stderr
    preds = json.loads((out / "predictions.json").read_text())
    files = {p["file_name"].split("/")[-1] for p in preds}
    assert files == {"a_rgb.png", "b_gray.png", "c_rgba.png", "e_last.jpg"}
    sizes = {"a_rgb.png": (150, 100), "b_gray.png": (60, 90), "c_rgba.png": (64, 64), "e_last.jpg": (120, 80)}
    for p in preds:
        x, y, w, h = p["bbox"]
        W, H = sizes[p["file_name"].split("/")[-1]]
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= W + 1e-3 and y + h <= H + 1e-3
        assert p["score"] >= 0.2
        assert (p["category_id"], p["category_name"]) in {(2, "disk"), (4, "square"), (9, "star")}
    assert sorted(f.name for f in (out / "vis").iterdir()) == ["a_rgb.jpg", "b_gray.jpg", "c_rgba.jpg", "e_last.jpg"]


def test_api_accepts_arrays_and_tensors_alike(tiny_weights):
    weights, _ = tiny_weights
    det = nasfpn.load(weights=weights)
    rgb = np.random.default_rng(1).integers(0, 255, (100, 150, 3), dtype=np.uint8)
    a = det.predict([rgb], score_thr=0.2)[0]
    b = det.predict([torch.from_numpy(rgb).permute(2, 0, 1).float() / 255], score_thr=0.2)[0]
    assert len(a["boxes"]) > 0
    np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-4)
    np.testing.assert_array_equal(a["category_ids"], np.array([2, 4, 9])[a["labels"]])
    assert (a["boxes"][:, 2] <= 150 + 1e-3).all() and (a["boxes"][:, 3] <= 100 + 1e-3).all()
