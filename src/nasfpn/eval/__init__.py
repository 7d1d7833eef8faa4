"""Evaluation: COCO box metrics and results files."""

from nasfpn.eval.coco import (
    STAT_KEYS,
    evaluate_detections,
    format_table,
    results_from_predictions,
    write_metrics_json,
)

__all__ = [
    "STAT_KEYS",
    "evaluate_detections",
    "format_table",
    "results_from_predictions",
    "write_metrics_json",
]
