"""The evaluation report (``engine.reports``): PR curves against COCO's precision array, the
confusion matrix of a hand-made case, the files; and the TensorBoard logging of training."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
from PIL import Image

from nasfpn.apps.evaluate import score_results
from nasfpn.engine.reports import confusion_matrix, pr_curves, write_report

CATS = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]


def _gt() -> dict:
    """Image 1: a cat and a dog; image 2: a dog (and a crowd region)."""
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 64, "height": 48},
            {"id": 2, "file_name": "b.png", "width": 64, "height": 48},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [30, 10, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [5, 5, 16, 16], "area": 256, "iscrowd": 0},
            {"id": 4, "image_id": 2, "category_id": 1, "bbox": [0, 30, 30, 18], "area": 540, "iscrowd": 1},
        ],
        "categories": CATS,
    }


def _results() -> list[dict]:
    return [
        {"image_id": 1, "category_id": 1, "bbox": [2, 3, 20, 19], "score": 0.9},  # correct cat
        {"image_id": 1, "category_id": 1, "bbox": [31, 10, 19, 20], "score": 0.8},  # the dog, called cat
        {"image_id": 2, "category_id": 2, "bbox": [40, 2, 20, 20], "score": 0.7},  # nothing there
        {"image_id": 2, "category_id": 2, "bbox": [5, 5, 16, 16], "score": 0.1},  # the dog, below 0.3
        {"image_id": 2, "category_id": 1, "bbox": [1, 30, 29, 18], "score": 0.95},  # on the crowd region
    ]


def test_confusion_matrix_counts():
    errors = confusion_matrix(_gt(), _results(), iou=0.5, score_threshold=0.3)
    # rows: ground truth cat, dog, background; columns: detected cat, dog, background
    assert errors.matrix.tolist() == [[1, 0, 0], [1, 0, 1], [0, 1, 0]]
    assert [(r["image_id"], r["score"]) for r in errors.false_positives] == [(2, 0.7)]
    assert [a["id"] for a in errors.misses] == [3]
    # A lower threshold takes the 0.1 detection: the dog of image 2 is found.
    low = confusion_matrix(_gt(), _results(), iou=0.5, score_threshold=0.05)
    assert low.matrix.tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 0]]


def test_confusion_matching_is_greedy_by_score():
    gt = _gt()
    gt["annotations"] = gt["annotations"][:1]
    # Two cats on one ground-truth cat: the better-scored one takes it, the other is a false positive.
    res = [
        {"image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 20], "score": 0.5},
        {"image_id": 1, "category_id": 2, "bbox": [2, 2, 20, 19], "score": 0.6},
    ]
    errors = confusion_matrix(gt, res, 0.5, 0.3)
    assert errors.matrix.tolist() == [[0, 1, 0], [0, 0, 0], [1, 0, 0]]


def test_pr_curves_match_coco_precision():
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, res = _gt(), _results()
    curves = pr_curves(gt, res)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(res)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert curves["iou"] == pytest.approx(0.5)
    assert len(curves["recall"]) == 101
    for k, cat in enumerate(CATS):
        expected = ev.eval["precision"][0, :, k, 0, -1]
        np.testing.assert_allclose(curves["classes"][cat["name"]]["precision"], expected)
    # By hand: cat is found once in one, at the top score: precision 1 up to recall 1.
    assert curves["classes"]["cat"]["precision"] == [1.0] * 101
    # dog: the 0.7 false positive ranks above the 0.1 hit on one of the two dogs: precision 1/2 up to recall 1/2.
    dog = curves["classes"]["dog"]["precision"]
    assert dog[:51] == [0.5] * 51 and dog[51:] == [0.0] * 50
    ap50 = np.mean([c["AP"] for c in curves["classes"].values()])
    assert ap50 == pytest.approx(ev.stats[1])


def test_pr_curves_class_without_ground_truth():
    gt = _gt()
    gt["categories"] = [*CATS, {"id": 5, "name": "kite"}]
    curves = pr_curves(gt, _results())
    assert curves["classes"]["kite"] == {"category_id": 5, "precision": None, "AP": None}


def test_report_files(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 48), (90, 90, 90)).save(images / name)
    out = tmp_path / "report"
    written = write_report(_gt(), _results(), out, images)
    names = sorted(str(p.relative_to(out)) for p in written)
    assert names == [
        "confusion_matrix.json",
        "confusion_matrix.png",
        "pr_curves.json",
        "pr_curves.png",
        "worst/fp_1.png",
        "worst/miss_1.png",
    ]
    assert all(p.stat().st_size > 0 for p in written)
    cm = json.loads((out / "confusion_matrix.json").read_text())
    assert cm["labels"] == ["cat", "dog", "background"]
    assert cm["matrix"] == [[1, 0, 0], [1, 0, 1], [0, 1, 0]]
    assert (cm["iou"], cm["score_threshold"]) == (0.5, 0.3)
    # The false-positive picture shows the detection: its pixels differ from the plain grey image.
    assert np.asarray(Image.open(out / "worst" / "fp_1.png")).std() > 0


def test_score_results_writes_report_without_pictures(tmp_path):
    ann, res = tmp_path / "gt.json", tmp_path / "res.json"
    ann.write_text(json.dumps(_gt()))
    res.write_text(json.dumps(_results()))
    metrics = score_results(ann, res, report_dir=tmp_path / "out", print_fn=lambda *a: None)
    assert metrics["AP50"] >= 0
    assert (tmp_path / "out" / "pr_curves.json").is_file()
    assert (tmp_path / "out" / "confusion_matrix.png").is_file()
    assert not (tmp_path / "out" / "worst").exists()


def test_run_eval_writes_report_and_progress_lines(tmp_path, capsys):
    from deploy_helpers import tiny_model
    from nasfpn.apps.evaluate import run_eval
    from nasfpn.deploy.predictor import export_weights

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(images / name)
    ann = tmp_path / "gt.json"
    ann.write_text(json.dumps(_gt()))
    cfg, model = tiny_model(["model.head.num_classes=2", "data.image_size=128"])
    weights = tmp_path / "w.safetensors"
    export_weights(model, cfg, weights)
    out = tmp_path / "eval"
    run_eval(None, weights, ann, images, out, device="cpu", batch_size=2, print_fn=lambda *a: None)
    for name in ("metrics.json", "results.json", "pr_curves.json", "pr_curves.png", "confusion_matrix.json"):
        assert (out / name).is_file(), name
    # The untrained model scores nothing above 0.3: its three objects are misses, and pictured.
    cm = json.loads((out / "confusion_matrix.json").read_text())
    assert cm["matrix"] == [[0, 0, 1], [0, 0, 2], [0, 0, 0]]
    assert sorted(p.name for p in (out / "worst").iterdir()) == ["miss_1.png", "miss_2.png", "miss_3.png"]
    # stderr is not a terminal under pytest: progress comes as plain lines.
    assert "eval: 2/2 images" in capsys.readouterr().err


def test_progress_lines(capsys):
    from nasfpn.engine.hooks import ProgressLines

    lines = ProgressLines("eval", 5, every=2)
    for _ in range(5):
        lines.update(1)
    err = [line.split(" (")[0] for line in capsys.readouterr().err.splitlines()]
    assert err == ["eval: 2/5 images", "eval: 4/5 images", "eval: 5/5 images"]


# --------------------------------------------------------------------------- TensorBoard


def test_tensorboard_absent_is_a_clear_error(tmp_path, monkeypatch):
    from engine_utils import synthetic_data, tiny_config
    from nasfpn.engine import hooks
    from nasfpn.engine.trainer import train

    monkeypatch.setattr(hooks, "tensorboard_available", lambda: False)
    with pytest.raises(ValueError, match=r"tensorboard package is not installed.*pip install 'nasfpn\[tensorboard\]'"):
        train(tiny_config(tensorboard=True), synthetic_data(tmp_path / "data", 2, 1), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run" / "tb").exists()
    hooks.TensorBoardLog(tmp_path / "off", enabled=False).step({"step": 0, "loss": 1.0})  # off: no check, no file
    assert not (tmp_path / "off").exists()


def test_tensorboard_event_file(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from engine_utils import synthetic_data, tiny_config
    from nasfpn.engine.trainer import train

    data = synthetic_data(tmp_path / "data", 4, 2)
    train(tiny_config(epochs=1, tensorboard=True), data, tmp_path / "run", progress=False, quiet=True, max_steps=2)
    assert (tmp_path / "run" / "metrics.csv").is_file()  # the CSV stays
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/loss_cls", "train/loss_bbox", "train/lr", "val/AP", "val/AP50"} <= set(tags)
    assert [e.step for e in events.Scalars("train/loss")] == [0]  # 4 images, batch 4: one step
    assert [e.step for e in events.Scalars("val/AP")] == [1]
    assert "val/APl" not in tags  # undefined (-1: no large objects) is left out
