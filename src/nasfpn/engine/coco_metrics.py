"""COCO box evaluation: metrics, the printed summary, results JSON.

The engine is faster-coco-eval (a C++ port of pycocotools' ``COCOeval`` that gives the same
numbers, checked against pycocotools in ``tests/test_eval_coco.py``). This module adds what a
training run needs around it:

* ``evaluate_detections``: ground truth + detections in COCO results format -> a flat dict with
  the 12 standard statistics under ``STAT_KEYS`` and a per-category AP table.
* ``results_from_predictions``: the detector's per-image outputs (xyxy boxes, contiguous labels)
  -> COCO results (xywh boxes, dataset category ids).
* ``format_table``: the 12-line summary exactly as pycocotools prints it, plus per-class AP.
* ``write_metrics_json``: atomic write of a metrics dict.

Conventions: a statistic is ``-1.0`` when it is undefined (no ground truth in that area range),
as in pycocotools; a per-class AP is ``None`` when the category has no (non-crowd) ground truth.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

from nasfpn.core.fileio import write_json_atomic

STAT_KEYS: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)

# (AP or AR, IoU label, area label, maxDets) for each key, in pycocotools' print order.
_SUMMARY_ROWS: tuple[tuple[bool, str, str, int], ...] = (
    (True, "0.50:0.95", "all", 100),
    (True, "0.50", "all", 100),
    (True, "0.75", "all", 100),
    (True, "0.50:0.95", "small", 100),
    (True, "0.50:0.95", "medium", 100),
    (True, "0.50:0.95", "large", 100),
    (False, "0.50:0.95", "all", 1),
    (False, "0.50:0.95", "all", 10),
    (False, "0.50:0.95", "all", 100),
    (False, "0.50:0.95", "small", 100),
    (False, "0.50:0.95", "medium", 100),
    (False, "0.50:0.95", "large", 100),
)


def _silent(*args: Any, **kwargs: Any) -> None:
    pass


def _load_json(source: str | Path, what: str) -> Any:
    path = Path(source)
    try:
        with path.open() as f:
            return json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read {what} file {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} file {path} is not valid JSON: {e}") from e


def _load_gt(gt: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(gt, (str, Path)):
        data = _load_json(gt, "ground-truth")
    else:
        # The engine writes flags into annotation dicts; keep the caller's dict untouched.
        data = copy.deepcopy(dict(gt))
    if not isinstance(data, dict):
        raise ValueError("ground truth must be a COCO dict with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"ground truth has no {key!r} list")
    return data


def _check_results(results: list[Any], gt: dict[str, Any]) -> list[dict[str, Any]]:
    """Validate results against the ground truth; return clean copies (the engine mutates them)."""
    image_ids = {img["id"] for img in gt["images"]}
    category_ids = {cat["id"] for cat in gt["categories"]}
    clean: list[dict[str, Any]] = []
    bad_images: set[Any] = set()
    bad_categories: set[Any] = set()
    for i, res in enumerate(results):
        if not isinstance(res, Mapping):
            raise ValueError(f"result {i} is not a dict: {res!r}")
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in res]
        if missing:
            raise ValueError(f"result {i} lacks key(s) {missing}")
        bbox = res["bbox"]
        if len(bbox) != 4:
            raise ValueError(f"result {i}: bbox must be [x, y, w, h], got {bbox!r}")
        if res["image_id"] not in image_ids:
            bad_images.add(res["image_id"])
        if res["category_id"] not in category_ids:
            bad_categories.add(res["category_id"])
        clean.append(
            {
                "image_id": res["image_id"],
                "category_id": res["category_id"],
                "bbox": [float(v) for v in bbox],
                "score": float(res["score"]),
            }
        )
    if bad_images:
        shown = sorted(bad_images, key=str)[:10]
        raise ValueError(
            f"{len(bad_images)} result image id(s) are not in the ground truth, e.g. {shown}; "
            "were the detections made on another split?"
        )
    if bad_categories:
        raise ValueError(
            f"result category id(s) {sorted(bad_categories, key=str)} are not ground-truth categories "
            f"{sorted(category_ids)}; map model labels to dataset ids (results_from_predictions)"
        )
    return clean


def evaluate_detections(
    gt: str | Path | Mapping[str, Any],
    results: Sequence[Mapping[str, Any]] | str | Path,
) -> dict[str, Any]:
    """COCO box metrics of ``results`` against the ground truth ``gt``.

    ``gt``: a COCO annotation file or dict. ``results``: a COCO results list (or a JSON file of
    one), each ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``.

    Returns ``{key: float for key in STAT_KEYS}`` (pycocotools' ``stats``, -1.0 where undefined)
    plus ``"per_class"``: ``{category name: AP@[.5:.95] or None}`` in category-id order.
    Raises ``ValueError`` for results on unknown images or categories.
    """
    gt_data = _load_gt(gt)
    raw = _load_json(results, "results") if isinstance(results, (str, Path)) else results
    if not isinstance(raw, (list, tuple)):
        raise ValueError("results must be a list of dicts (COCO results format)")
    clean = _check_results(list(raw), gt_data)

    coco_gt = COCO(gt_data, print_function=_silent)
    coco_dt = coco_gt.loadRes(clean)
    coco_eval = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=_silent)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()

    metrics: dict[str, Any] = {key: float(v) for key, v in zip(STAT_KEYS, coco_eval.stats[: len(STAT_KEYS)])}
    metrics["per_class"] = _per_class_ap(coco_eval.eval["precision"], coco_eval.params.catIds, gt_data)
    return metrics


def _per_class_ap(precision: np.ndarray, cat_ids: Sequence[int], gt: dict[str, Any]) -> dict[str, float | None]:
    """AP@[.5:.95] per category from the (T, R, K, A, M) precision array (area all, maxDets 100).

    Entries of -1 mark (IoU, recall) cells without ground truth; a category with only such cells
    has no AP.
    """
    names = {cat["id"]: cat["name"] for cat in gt["categories"]}
    out: dict[str, float | None] = {}
    for k, cat_id in enumerate(cat_ids):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out[names[cat_id]] = float(np.mean(p)) if p.size else None
    return out


def format_table(metrics: Mapping[str, Any]) -> str:
    """The 12-line COCO summary (same text as pycocotools prints) and a per-class AP table."""
    lines = []
    for key, (is_ap, iou, area, max_dets) in zip(STAT_KEYS, _SUMMARY_ROWS):
        title, kind = ("Average Precision", "(AP)") if is_ap else ("Average Recall", "(AR)")
        lines.append(
            f" {title:<18} {kind} @[ IoU={iou:<9} | area={area:>6s} | maxDets={max_dets:>3d} ] = {metrics[key]:0.3f}"
        )
    per_class = metrics.get("per_class") or {}
    if per_class:
        width = max(8, *(len(name) for name in per_class))
        lines.append("")
        lines.append(f"{'category':<{width}}  AP")
        for name, ap in per_class.items():
            lines.append(f"{name:<{width}}  {'-' if ap is None else f'{ap:0.3f}'}")
    return "\n".join(lines)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def results_from_predictions(
    predictions: Iterable[Mapping[str, Any]],
    label_to_category_id: Sequence[int] | Mapping[int, int],
) -> list[dict[str, Any]]:
    """Per-image detector outputs -> a COCO results list.

    Each prediction holds ``image_id``, ``boxes`` (N, 4) xyxy in original-image pixels,
    ``scores`` (N,) and ``labels`` (N,) contiguous model labels (tensors or arrays).
    ``label_to_category_id[label]`` gives the dataset category id. Boxes become xywh floats.
    """
    results: list[dict[str, Any]] = []
    for i, pred in enumerate(predictions):
        if "image_id" not in pred:
            raise ValueError(f"prediction {i} has no 'image_id'")
        image_id = int(_to_numpy(pred["image_id"]))
        boxes = _to_numpy(pred["boxes"]).astype(np.float64).reshape(-1, 4)
        scores = _to_numpy(pred["scores"]).astype(np.float64).reshape(-1)
        labels = _to_numpy(pred["labels"]).astype(np.int64).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"prediction {i}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
        for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            try:
                category_id = int(label_to_category_id[label])
            except (IndexError, KeyError):
                raise ValueError(f"prediction {i}: label {label} has no category id") from None
            x0, y0, x1, y1 = box
            results.append(
                {"image_id": image_id, "category_id": category_id, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score}
            )
    return results


def _json_safe(value: Any) -> Any:
    """Plain JSON types; NaN and infinities (not valid JSON) become null."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics_json(metrics: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``metrics`` as JSON; a temp file replaced into place, so readers never see half a file."""
    return write_json_atomic(_json_safe(metrics), path, indent=2)
