"""Training and evaluation: ``train(cfg, DataPaths(...), out_dir) -> TrainResult``, COCO evaluation,
the training step (``engine.step``), the LR schedule, SGD parameter groups, checkpoints and
distributed helpers."""

from nasfpn.engine.data_paths import DataPaths
from nasfpn.engine.evaluate import evaluate_model
from nasfpn.engine.schedule import LRSchedule, scaled_lr
from nasfpn.engine.trainer import TrainResult, train

__all__ = ["DataPaths", "LRSchedule", "TrainResult", "evaluate_model", "scaled_lr", "train"]
