"""``nasfpn eval``: COCO box AP of weights on an annotated image folder (one or several processes
under ``torchrun``), or the score of an existing COCO results file.

The work is ``engine.evaluate.evaluate_model``; this module loads the weights, writes
``results.json``, ``metrics.json`` and the report (``engine.reports``: precision-recall curves,
confusion matrix, pictures of the worst errors) and prints the COCO table.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nasfpn.core.config import Config
from nasfpn.core.fileio import write_json_atomic
from nasfpn.data.io import read_json
from nasfpn.deploy.predictor import Detector, load
from nasfpn.engine import distributed as D
from nasfpn.engine.coco_metrics import evaluate_detections, format_table, write_metrics_json
from nasfpn.engine.evaluate import check_ground_truth, evaluate_model
from nasfpn.engine.reports import write_report


@dataclass
class EvalOutcome:
    metrics: dict[str, Any]
    results_path: Path | None
    metrics_path: Path | None


def run_eval(
    model_or_config: str | Path | Config | None,
    weights: str | Path,
    ann_file: str | Path,
    image_dir: str | Path,
    out_dir: str | Path | None = None,
    device: str | None = None,
    batch_size: int = 8,
    workers: int = 0,
    overrides: list[str] | None = None,
    config_file: str | Path | None = None,
    progress: bool | None = None,
    optimize: bool | dict[str, Any] = True,
    print_fn=print,
) -> EvalOutcome | None:
    """Evaluate weights on a COCO dataset: print the COCO table and per-class AP, write
    ``results.json`` (COCO results, the dataset's category ids) and ``metrics.json`` into
    ``out_dir``. Runs in several processes under ``torchrun``; returns None on ranks > 0.
    ``optimize``: the network that runs (``Detector``'s argument): the BN-folded fp32 fast path by
    default, False the plain model, ``{"precision": "bf16"}``, or ``{"precision": "auto"}`` (timed at
    this batch size; under ``torchrun`` the first process decides for all).
    A malformed ground-truth file is refused (``check_ground_truth``) before the weights are read."""

    check_ground_truth(ann_file, image_dir)
    info = D.init_distributed(device)
    requested = optimize
    auto = isinstance(optimize, dict) and optimize.get("precision") == "auto"
    if isinstance(optimize, dict) and auto:
        optimize = {"batch_size": batch_size, **optimize}
    try:
        # Several processes must run one precision: the first measures, the others take its choice.
        det = load(
            model_or_config,
            weights=weights,
            device=info.device,
            overrides=overrides,
            optimize=optimize if info.is_main or not auto else False,
            config_file=config_file,
        )
        chosen = det.precision_choice.precision if det.precision_choice is not None else None
        if auto and info.distributed:
            chosen = D.broadcast_object(chosen)
            if not info.is_main:
                assert isinstance(optimize, dict)
                det = Detector(det.model, det.config, info.device, {**optimize, "precision": chosen})
        if info.is_main and det.precision_choice is not None:
            print_fn(det.precision_choice.describe())
        cfg = det.config
        metrics, results = evaluate_model(
            det.runner, cfg, ann_file, image_dir, info.device, batch_size, workers, progress=progress, check=False
        )
        if not info.is_main:
            return None
        assert metrics is not None
        results_path = metrics_path = None
        if out_dir is not None:
            out = Path(out_dir)
            results_path = out / "results.json"
            write_json_atomic(results, results_path)
            metrics_path = write_metrics_json(
                {
                    "model": cfg.name,
                    "weights": str(weights),
                    "ann_file": str(ann_file),
                    "optimize": requested,
                    **({"precision_auto": chosen} if auto else {}),
                    **metrics,
                },
                out / "metrics.json",
            )
            _report(ann_file, results, out, image_dir)
        print_fn(format_table(metrics))
        print_fn(f"{metrics['num_images']} images in {metrics['eval_seconds']:.1f} s")
        return EvalOutcome(metrics, results_path, metrics_path)
    finally:
        D.cleanup(info)


def score_results(
    ann_file: str | Path,
    results_file: str | Path,
    json_out: str | Path | None = None,
    print_fn=print,
    report_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Score an existing COCO results file against ground truth (no model involved; the ground
    truth checked first, ``check_ground_truth``). ``report_dir``: write the report there too
    (curves and confusion matrix; no pictures, as there are no images)."""
    check_ground_truth(ann_file)
    metrics = evaluate_detections(ann_file, results_file)
    print_fn(format_table(metrics))
    if json_out is not None:
        write_metrics_json(metrics, json_out)
    if report_dir is not None:
        _report(ann_file, read_json(results_file), Path(report_dir), None)
    return metrics


def _report(
    ann_file: str | Path | Mapping[str, Any], results: list[dict[str, Any]], out: Path, image_dir: str | Path | None
) -> None:
    """The report is extra: a failure is a warning, and metrics.json is already written."""
    try:
        gt = ann_file if isinstance(ann_file, Mapping) else read_json(ann_file)
        write_report(gt, results, out, image_dir)
    except Exception as e:
        print(f"warning: could not write the report into {out}: {e}", file=sys.stderr)
