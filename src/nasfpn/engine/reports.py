"""The evaluation report written next to ``metrics.json`` (``nasfpn eval --out DIR``)::

    pr_curves.json / pr_curves.png                precision at each recall, per class, IoU 0.5
    confusion_matrix.json / confusion_matrix.png  counts, with a background row and column
    worst/fp_*.png, worst/miss_*.png              the worst false positives and misses, drawn

The precision-recall curves are read from the COCO evaluation's own ``eval["precision"]`` array
(T, R, K, A, M: IoU thresholds, 101 recall points, categories, area ranges, max detections), at
IoU 0.5, area "all" and 100 detections per image, so they agree with the printed AP50.

The confusion matrix uses its own, stated rule (``confusion_matrix``): COCO's matching is per
class and cannot show which class a detection was confused with.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

from nasfpn.core.fileio import atomic_path, write_json_atomic

PR_IOU = 0.5
CM_IOU = 0.5
CM_SCORE = 0.3
NUM_PICTURES = 4  # of each kind: a handful, so the report stays cheap


def _silent(*args: Any, **kwargs: Any) -> None:
    pass


def _categories(gt: Mapping[str, Any]) -> list[dict[str, Any]]:
    return sorted(gt["categories"], key=lambda c: c["id"])


def pr_curves(gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]], iou: float = PR_IOU) -> dict[str, Any]:
    """Per-class precision at COCO's 101 recall points, at IoU ``iou``, from ``COCOeval``'s
    ``eval["precision"]`` (area "all", 100 detections). A class without ground truth has
    ``precision`` None; COCO's -1 cells (recall not reached) are kept as 0 there, as COCO's AP does."""
    coco_gt = COCO({k: gt[k] for k in ("images", "annotations", "categories")}, print_function=_silent)
    clean = [
        {"image_id": r["image_id"], "category_id": r["category_id"], "bbox": list(r["bbox"]), "score": r["score"]}
        for r in results
    ]
    coco_dt = coco_gt.loadRes(clean)
    ev = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=_silent)
    ev.evaluate()
    ev.accumulate()
    return pr_from_precision(ev.eval["precision"], ev.params.iouThrs, ev.params.recThrs, ev.params.catIds, gt, iou)


def pr_from_precision(
    precision: np.ndarray,
    iou_thrs: Sequence[float],
    rec_thrs: Sequence[float],
    cat_ids: Sequence[int],
    gt: Mapping[str, Any],
    iou: float = PR_IOU,
) -> dict[str, Any]:
    """The curves of ``pr_curves`` from a (T, R, K, A, M) precision array."""
    t = int(np.argmin(np.abs(np.asarray(iou_thrs) - iou)))
    names = {c["id"]: c["name"] for c in gt["categories"]}
    classes: dict[str, Any] = {}
    for k, cat_id in enumerate(cat_ids):
        p = np.asarray(precision[t, :, k, 0, -1], dtype=np.float64)
        if (p > -1).any():
            # pycocotools fills the recall points past the last reached one with 0 too (then -1 only
            # for a category without ground truth): AP50 is the mean over all 101 points.
            p = np.where(p > -1, p, 0.0)
            classes[names[cat_id]] = {"category_id": int(cat_id), "precision": p.tolist(), "AP": float(p.mean())}
        else:
            classes[names[cat_id]] = {"category_id": int(cat_id), "precision": None, "AP": None}
    return {"iou": float(iou_thrs[t]), "recall": [float(r) for r in rec_thrs], "classes": classes}


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xywh boxes ``a`` (N, 4) with ``b`` (M, 4)."""
    ax0, ay0, ax1, ay1 = a[:, 0:1], a[:, 1:2], a[:, 0:1] + a[:, 2:3], a[:, 1:2] + a[:, 3:4]
    bx0, by0, bx1, by1 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    w = np.clip(np.minimum(ax1, bx1) - np.maximum(ax0, bx0), 0, None)
    h = np.clip(np.minimum(ay1, by1) - np.maximum(ay0, by0), 0, None)
    inter = w * h
    union = a[:, 2:3] * a[:, 3:4] + b[:, 2] * b[:, 3] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


@dataclass
class Errors:
    """The outcome of the confusion matching: the matrix and the unmatched items."""

    matrix: np.ndarray  # (K + 1, K + 1): rows ground truth, columns detections, last = background
    false_positives: list[dict[str, Any]]  # results matching no ground truth, best score first
    misses: list[dict[str, Any]]  # ground-truth annotations no detection matched, largest first


def confusion_matrix(
    gt: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    iou: float = CM_IOU,
    score_threshold: float = CM_SCORE,
) -> Errors:
    """Counts of (ground-truth class, detected class), with a background row and column.

    The rule, per image: the detections with score >= ``score_threshold`` are taken best score
    first; each one matches the not yet matched ground-truth box (of any class) with the highest
    IoU, if that IoU is >= ``iou``. A match counts in (its ground-truth class, its detected class):
    the diagonal is correct, off the diagonal a confusion. A detection matching nothing is a false
    positive (background row); a ground-truth box matched by none is a miss (background column).
    Crowd annotations are not ground truth here; a detection whose best match would be a crowd
    region (IoU >= ``iou``) is not counted at all.
    """
    cats = _categories(gt)
    index = {c["id"]: i for i, c in enumerate(cats)}
    bg = len(cats)
    matrix = np.zeros((bg + 1, bg + 1), dtype=np.int64)
    by_image_gt: dict[Any, list[Mapping[str, Any]]] = {}
    for ann in gt["annotations"]:
        by_image_gt.setdefault(ann["image_id"], []).append(ann)
    by_image_dt: dict[Any, list[Mapping[str, Any]]] = {}
    for res in results:
        if res["score"] >= score_threshold:
            by_image_dt.setdefault(res["image_id"], []).append(res)
    fps: list[dict[str, Any]] = []
    misses: list[dict[str, Any]] = []
    for img in gt["images"]:
        anns = by_image_gt.get(img["id"], [])
        real = [a for a in anns if not a.get("iscrowd", 0)]
        crowd = [a for a in anns if a.get("iscrowd", 0)]
        dets = sorted(by_image_dt.get(img["id"], []), key=lambda r: -r["score"])
        matched = np.zeros(len(real), dtype=bool)
        if dets:
            d_boxes = np.asarray([d["bbox"] for d in dets], dtype=np.float64).reshape(-1, 4)
            ious = _iou_matrix(d_boxes, np.asarray([a["bbox"] for a in real], dtype=np.float64).reshape(-1, 4))
            crowd_ious = _iou_matrix(d_boxes, np.asarray([a["bbox"] for a in crowd], dtype=np.float64).reshape(-1, 4))
            for i, det in enumerate(dets):
                row = np.where(matched, -1.0, ious[i])
                j = int(np.argmax(row)) if row.size else -1
                if j >= 0 and row[j] >= iou:
                    matched[j] = True
                    matrix[index[real[j]["category_id"]], index[det["category_id"]]] += 1
                elif crowd_ious.size and crowd_ious[i].max() >= iou:
                    continue
                else:
                    matrix[bg, index[det["category_id"]]] += 1
                    fps.append(dict(det))
        for m in np.flatnonzero(~matched).tolist():
            matrix[index[real[m]["category_id"]], bg] += 1
            misses.append(dict(real[m]))
    fps.sort(key=lambda r: -r["score"])
    misses.sort(key=lambda a: -(a["bbox"][2] * a["bbox"][3]))
    return Errors(matrix, fps, misses)


# --------------------------------------------------------------------------- files


def _plot_pr(curves: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name, c in curves["classes"].items():
        if c["precision"] is not None:
            ax.plot(curves["recall"], c["precision"], label=f"{name} ({c['AP']:.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    if curves["classes"]:
        ax.legend(fontsize="small", title="class (AP50)", loc="lower left")
    ax.set_title(f"precision-recall at IoU {curves['iou']:.2f}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _plot_confusion(matrix: np.ndarray, labels: list[str], iou: float, score: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    size = min(16.0, 3.0 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(np.log1p(matrix), cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=90)
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("detected")
    ax.set_ylabel("ground truth")
    if n <= 30:  # counts stay readable
        peak = matrix.max() if matrix.size else 0
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    dark = math.log1p(matrix[i, j]) > 0.6 * math.log1p(peak)
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color="w" if dark else "k")
    ax.set_title(f"confusion at IoU {iou:.2f}, score >= {score:.2f}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _xyxy(bbox: Sequence[float]) -> list[float]:
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y + h]


def _pictures(
    gt: Mapping[str, Any], errors: Errors, image_dir: Path, out: Path, count: int, names: list[str]
) -> list[Path]:
    from nasfpn.data.io import ImageReadError, read_image
    from nasfpn.data.vis import draw_detections

    cats = _categories(gt)
    index = {c["id"]: i for i, c in enumerate(cats)}
    files = {img["id"]: img["file_name"] for img in gt["images"]}
    gt_by_image: dict[Any, list[Mapping[str, Any]]] = {}
    for ann in gt["annotations"]:
        gt_by_image.setdefault(ann["image_id"], []).append(ann)
    gt_names = [f"gt {n}" for n in names]
    written: list[Path] = []
    items = [("fp", r) for r in errors.false_positives[:count]] + [("miss", a) for a in errors.misses[:count]]
    for k, (kind, item) in enumerate(items):
        try:
            image = read_image(image_dir / files[item["image_id"]])
        except ImageReadError:
            continue  # a picture is a nicety: a missing image is skipped
        anns = gt_by_image.get(item["image_id"], [])
        others = [a for a in anns if kind == "fp" or a.get("id") != item.get("id")]
        # The image's ground truth first (tags "gt name"), then the item on top.
        picture = draw_detections(
            image,
            np.asarray([_xyxy(a["bbox"]) for a in others]).reshape(-1, 4),
            [index[a["category_id"]] for a in others],
            class_names=gt_names,
            line_width=1,
        )
        label = index[item["category_id"]]
        if kind == "fp":
            picture = draw_detections(picture, [_xyxy(item["bbox"])], [label], [item["score"]], names, line_width=3)
        else:
            picture = draw_detections(
                picture, [_xyxy(item["bbox"])], [label], class_names=[f"missed {n}" for n in names], line_width=3
            )
        n = sum(1 for kk, _ in items[:k] if kk == kind) + 1
        path = out / f"{kind}_{n}.png"
        with atomic_path(path) as tmp:
            picture.save(tmp, format="PNG")
        written.append(path)
    return written


def write_report(
    gt: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    image_dir: str | Path | None = None,
    iou: float = CM_IOU,
    score_threshold: float = CM_SCORE,
    num_pictures: int = NUM_PICTURES,
) -> list[Path]:
    """Write the report files into ``out_dir`` (see the module docstring); the pictures only with
    ``image_dir``. ``gt``: the COCO ground-truth dict; ``results``: COCO results, already checked
    against it (``evaluate_detections``). Returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = pr_curves(gt, results)
    write_json_atomic(curves, out / "pr_curves.json", indent=1)
    _plot_pr(curves, out / "pr_curves.png")
    errors = confusion_matrix(gt, results, iou, score_threshold)
    names = [c["name"] for c in _categories(gt)]
    labels = [*names, "background"]
    write_json_atomic(
        {
            "iou": iou,
            "score_threshold": score_threshold,
            "rule": "per image, detections with score >= score_threshold, best first, each matches the unmatched "
            "ground truth of any class with the highest IoU >= iou; unmatched detections count in the background "
            "row, unmatched ground truth in the background column",
            "rows": "ground truth",
            "columns": "detected",
            "labels": labels,
            "matrix": errors.matrix.tolist(),
        },
        out / "confusion_matrix.json",
        indent=1,
    )
    _plot_confusion(errors.matrix, labels, iou, score_threshold, out / "confusion_matrix.png")
    written = [out / n for n in ("pr_curves.json", "pr_curves.png", "confusion_matrix.json", "confusion_matrix.png")]
    if image_dir is not None and num_pictures > 0:
        worst = out / "worst"
        worst.mkdir(exist_ok=True)
        written += _pictures(gt, errors, Path(image_dir), worst, num_pictures, names)
    return written
