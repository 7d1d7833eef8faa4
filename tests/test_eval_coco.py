"""COCO evaluation: numbers and printed text against pycocotools, plus the error cases."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math

import numpy as np
import pytest
import torch

from nasfpn.engine.coco_metrics import (
    STAT_KEYS,
    evaluate_detections,
    format_table,
    results_from_predictions,
    write_metrics_json,
)

pycocotools = pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

# Non-contiguous on purpose; "dog" has ground truth but no detections, "kite" has detections
# but no ground truth, "zebra" has neither.
CATEGORIES = [
    {"id": 1, "name": "person"},
    {"id": 3, "name": "car"},
    {"id": 7, "name": "dog"},
    {"id": 10, "name": "kite"},
    {"id": 13, "name": "zebra"},
]


def _case() -> tuple[dict, list[dict]]:
    """Ground truth and detections covering the branches of COCO matching."""
    rng = np.random.default_rng(1234)
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480} for i in (2, 5, 6, 9, 11, 14)]
    anns: list[dict] = []
    dets: list[dict] = []

    def add_gt(image_id: int, cat: int, box: list[float], crowd: int = 0, area: float | None = None) -> None:
        anns.append(
            {
                "id": len(anns) + 1,
                "image_id": image_id,
                "category_id": cat,
                "bbox": box,
                "area": box[2] * box[3] if area is None else area,
                "iscrowd": crowd,
            }
        )

    def add_det(image_id: int, cat: int, box: list[float], score: float) -> None:
        dets.append({"image_id": image_id, "category_id": cat, "bbox": box, "score": score})

    # Random objects of all three area ranges; detections jittered around them (varied IoU),
    # some missed, some duplicated, plus random false positives.
    sides = {"small": (6, 30), "medium": (34, 90), "large": (100, 300)}
    for image_id in (2, 5, 6, 9, 11):
        for _ in range(int(rng.integers(3, 9))):
            cat = int(rng.choice([1, 3, 7]))
            lo, hi = sides[str(rng.choice(list(sides)))]
            w, h = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
            x, y = float(rng.uniform(0, 640 - w)), float(rng.uniform(0, 480 - h))
            add_gt(image_id, cat, [x, y, w, h])
            if cat == 7 or rng.random() < 0.15:
                continue  # missed
            for _ in range(int(rng.integers(1, 3))):  # 1 or 2 (a duplicate)
                j = rng.uniform(-0.12, 0.12, size=4) * [w, h, w, h]
                box = [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])]
                add_det(image_id, cat, box, round(float(rng.uniform(0.05, 1.0)), 2))
        for _ in range(int(rng.integers(2, 6))):  # false positives, kite included
            cat = int(rng.choice([1, 3, 10]))
            w, h = float(rng.uniform(5, 200)), float(rng.uniform(5, 200))
            add_det(
                image_id,
                cat,
                [float(rng.uniform(0, 400)), float(rng.uniform(0, 300)), w, h],
                round(float(rng.uniform(0.05, 0.9)), 2),
            )

    # Crowd region: detections inside it are ignored, not false positives.
    add_gt(9, 1, [300.0, 200.0, 300.0, 250.0], crowd=1)
    add_det(9, 1, [320.0, 210.0, 60.0, 120.0], 0.77)
    add_det(9, 1, [420.0, 300.0, 80.0, 100.0], 0.31)
    # Area field differing from the box area (as for a segmentation area) decides the range.
    add_gt(11, 3, [10.0, 10.0, 40.0, 40.0], area=900.0)
    add_det(11, 3, [11.0, 10.0, 40.0, 41.0], 0.5)
    # An image with no ground truth: every detection on it is a false positive.
    add_det(14, 1, [5.0, 5.0, 50.0, 50.0], 0.95)
    add_det(14, 3, [100.0, 100.0, 20.0, 20.0], 0.5)
    # Many detections on one image, so maxDets 1 / 10 / 100 truncation all matter.
    for k in range(120):
        add_det(
            6,
            3,
            [float(k * 5 % 600), float(k * 3 % 440), 30.0 + k % 7, 25.0 + k % 5],
            round(0.25 + 0.2 * math.sin(k), 3),
        )

    gt = {"images": images, "annotations": anns, "categories": copy.deepcopy(CATEGORIES)}
    return gt, dets


def _pycocotools_eval(gt: dict, dets: list[dict]) -> tuple[COCOeval, list[str]]:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ev.summarize()
    return ev, out.getvalue().splitlines()


def test_matches_pycocotools_exactly():
    gt, dets = _case()
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    metrics = evaluate_detections(gt, dets)
    ref, printed = _pycocotools_eval(gt, dets)

    assert gt == gt_before and dets == dets_before  # inputs untouched
    # The case must be rich enough to mean something: every statistic defined and non-trivial.
    assert all(0.05 < v < 0.95 for v in ref.stats)
    for i, key in enumerate(STAT_KEYS):
        assert abs(metrics[key] - float(ref.stats[i])) < 1e-12, key

    precision = ref.eval["precision"]
    expected = {}
    for k, cat_id in enumerate(ref.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        expected[next(c["name"] for c in CATEGORIES if c["id"] == cat_id)] = float(p.mean()) if p.size else None
    assert list(metrics["per_class"]) == ["person", "car", "dog", "kite", "zebra"]
    assert metrics["per_class"]["dog"] == 0.0
    assert metrics["per_class"]["kite"] is None and metrics["per_class"]["zebra"] is None
    for name, ap in expected.items():
        got = metrics["per_class"][name]
        assert (got is None) == (ap is None), name
        if ap is not None:
            assert abs(got - ap) < 1e-12, name

    table = format_table(metrics).splitlines()
    assert table[:12] == printed
    assert any(line.split() == ["dog", "0.000"] for line in table[12:])
    assert any(line.split() == ["kite", "-"] for line in table[12:])


def test_results_file_and_gt_file(tmp_path):
    gt, dets = _case()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(dets))
    from_files = evaluate_detections(tmp_path / "gt.json", str(tmp_path / "res.json"))
    assert from_files == evaluate_detections(gt, dets)


def test_empty_results_give_zeros():
    gt, _ = _case()
    metrics = evaluate_detections(gt, [])
    assert all(metrics[k] == 0.0 for k in STAT_KEYS)
    assert metrics["per_class"] == {"person": 0.0, "car": 0.0, "dog": 0.0, "kite": None, "zebra": None}


def test_perfect_detections_from_predictions():
    gt, _ = _case()
    labels_to_ids = [c["id"] for c in CATEGORIES]
    predictions = []
    for img in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"] and not a["iscrowd"]]
        boxes = torch.tensor(
            [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns],
            dtype=torch.float64,
        ).reshape(-1, 4)
        labels = torch.tensor([labels_to_ids.index(a["category_id"]) for a in anns], dtype=torch.int64)
        predictions.append(
            {"image_id": torch.tensor(img["id"]), "boxes": boxes, "scores": torch.ones(len(anns)), "labels": labels}
        )
    results = results_from_predictions(predictions, labels_to_ids)
    assert len(results) == sum(1 for a in gt["annotations"] if not a["iscrowd"])
    first = next(a for a in gt["annotations"] if not a["iscrowd"])
    assert results[0]["image_id"] == first["image_id"] and isinstance(results[0]["image_id"], int)
    assert results[0]["category_id"] == first["category_id"]
    assert results[0]["bbox"] == pytest.approx(first["bbox"], abs=1e-9)
    metrics = evaluate_detections(gt, results)
    assert metrics["AP"] == 1.0 and metrics["AP50"] == 1.0 and metrics["AR100"] == 1.0
    assert metrics["per_class"]["person"] == 1.0


def test_results_from_predictions_mapping_and_numpy():
    preds = [
        {
            "image_id": 4,
            "boxes": np.array([[10.0, 20.0, 15.0, 60.0]]),
            "scores": np.array([0.25]),
            "labels": np.array([1]),
        }
    ]
    assert results_from_predictions(preds, {0: 1, 1: 5}) == [
        {"image_id": 4, "category_id": 5, "bbox": [10.0, 20.0, 5.0, 40.0], "score": 0.25}
    ]
    with pytest.raises(ValueError, match="label 1 has no category id"):
        results_from_predictions(preds, [1])
    bad = [{"image_id": 4, "boxes": np.zeros((2, 4)), "scores": np.zeros(1), "labels": np.zeros(2)}]
    with pytest.raises(ValueError, match="2 boxes, 1 scores"):
        results_from_predictions(bad, [1])


def test_unknown_image_id_is_an_error():
    gt, dets = _case()
    dets.append({"image_id": 999, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.5})
    with pytest.raises(ValueError, match=r"not in the ground truth, e\.g\. \[999\]"):
        evaluate_detections(gt, dets)


def test_unknown_category_id_is_an_error():
    gt, dets = _case()
    dets.append({"image_id": 2, "category_id": 2, "bbox": [0, 0, 10, 10], "score": 0.5})
    with pytest.raises(ValueError, match=r"category id\(s\) \[2\] are not ground-truth categories"):
        evaluate_detections(gt, dets)


def test_malformed_inputs_are_errors(tmp_path):
    gt, _ = _case()
    with pytest.raises(ValueError, match="lacks key"):
        evaluate_detections(gt, [{"image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match="bbox must be"):
        evaluate_detections(gt, [{"image_id": 2, "category_id": 1, "bbox": [0, 0, 1], "score": 1.0}])
    with pytest.raises(ValueError, match="cannot read results"):
        evaluate_detections(gt, tmp_path / "missing.json")
    with pytest.raises(ValueError, match="no 'annotations'"):
        evaluate_detections({"images": [], "categories": []}, [])


def test_write_metrics_json(tmp_path):
    path = tmp_path / "out" / "metrics.json"
    metrics = {"AP": np.float64(0.5), "per_class": {"a": float("nan"), "b": None, "c": 0.25}}
    assert write_metrics_json(metrics, path) == path
    assert json.loads(path.read_text()) == {"AP": 0.5, "per_class": {"a": None, "b": None, "c": 0.25}}
    write_metrics_json({"AP": 0.75}, path)  # replaces in place
    assert json.loads(path.read_text()) == {"AP": 0.75}
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]  # no temp files left
