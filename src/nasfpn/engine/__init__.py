"""Training and evaluation: ``train(cfg, DataPaths(...), out_dir) -> TrainResult``, COCO evaluation,
the training step (``engine.step``), the LR schedule, SGD parameter groups, checkpoints and
distributed helpers."""

from .data_paths import DataPaths
from .evaluate import evaluate_model, run_eval, score_results
from .schedule import LRSchedule, scaled_lr
from .trainer import TrainResult, train

__all__ = ["DataPaths", "LRSchedule", "TrainResult", "evaluate_model", "run_eval", "scaled_lr", "score_results", "train"]
