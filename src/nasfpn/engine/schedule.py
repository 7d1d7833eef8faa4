"""Learning rate as a pure function of the global step.

MMDetection's crop-640 schedule is two schedulers multiplied together:

- ``LinearLR(start_factor=warmup_ratio, by_epoch=False, end=warmup_iters)``: by iteration,
  ``factor = warmup_ratio + (1 - warmup_ratio) * min(step, warmup_iters) / warmup_iters``
  (the closed form of mmengine's recursive update; 0.1 at step 0, 1.0 from ``warmup_iters`` on);
- ``MultiStepLR(milestones, gamma, by_epoch=True)``: ``gamma ** (number of milestones <= epoch)``
  with ``epoch = step // iters_per_epoch`` counted from 0 (x0.1 from epoch 30, x0.01 from 40).

``lr_decay="cosine"`` replaces the steps by ``0.5 * (1 + cos(pi * step / total_iters))``.

A run planned to fit a time budget (``engine.budget``) changes ``total_iters`` as it measures its
speed: the decay is then stated in fractions of the run, the step milestones moved alike
(``step * full_iters / total_iters`` is compared with them); the warm-up stays in steps.

Because nothing is stateful, a resumed run recomputes exactly the learning rate it would have
had, and the schedule needs no entry in a checkpoint beyond the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from nasfpn.core.config import TrainConfig


def scaled_lr(base_lr: float, base_batch_size: int, total_batch: int) -> float:
    """Linear scaling rule: ``base_lr * total_batch / base_batch_size`` (0.08 at 64 images)."""
    if base_batch_size <= 0 or total_batch <= 0:
        raise ValueError(f"batch sizes must be positive, got base {base_batch_size}, total {total_batch}")
    return base_lr * total_batch / base_batch_size


@dataclass(frozen=True)
class LRSchedule:
    lr: float
    """Peak learning rate (after scaling by the batch size)."""
    iters_per_epoch: int
    warmup_iters: int = 1000
    warmup_ratio: float = 0.1
    milestones: tuple[int, ...] = (30, 40)
    """Epochs (0-based) from which the rate is multiplied by another ``gamma``."""
    gamma: float = 0.1
    decay: str = "step"
    """"step" or "cosine"."""
    total_iters: int = 0
    """Length of the run (needed by cosine)."""
    full_iters: int = 0
    """Length of the configured schedule (``epochs x iters_per_epoch``); 0: ``total_iters``. The
    step milestones are positions on it, moved in proportion when ``total_iters`` differs."""

    def __post_init__(self) -> None:
        if self.iters_per_epoch <= 0:
            raise ValueError(f"iters_per_epoch must be positive, got {self.iters_per_epoch}")
        if self.decay not in ("step", "cosine"):
            raise ValueError(f"lr decay must be 'step' or 'cosine', got {self.decay!r}")
        if self.decay == "cosine" and self.total_iters <= 0:
            raise ValueError("a cosine schedule needs the run's total_iters")

    @classmethod
    def from_config(cls, cfg: TrainConfig, lr: float, iters_per_epoch: int) -> LRSchedule:
        return cls(
            lr,
            iters_per_epoch,
            cfg.warmup_iters,
            cfg.warmup_ratio,
            tuple(cfg.milestones),
            cfg.gamma,
            cfg.lr_decay,
            cfg.epochs * iters_per_epoch,
            cfg.epochs * iters_per_epoch,
        )

    def fit(self, total_iters: int) -> LRSchedule:
        """The same schedule compressed (or stretched) to a run of ``total_iters`` steps."""
        return replace(self, total_iters=max(1, int(total_iters)), full_iters=self.full_iters or self.total_iters)

    def warmup_factor(self, step: int) -> float:
        if self.warmup_iters <= 0:
            return 1.0
        t = min(step, self.warmup_iters) / self.warmup_iters
        return self.warmup_ratio + (1.0 - self.warmup_ratio) * t

    def decay_factor(self, step: int) -> float:
        if self.decay == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_iters) / self.total_iters))
        if self.full_iters and self.total_iters and self.full_iters != self.total_iters:
            step = int(step * self.full_iters / self.total_iters)
        epoch = step // self.iters_per_epoch
        return self.gamma ** sum(1 for m in self.milestones if epoch >= m)

    def __call__(self, step: int) -> float:
        """Learning rate used by optimizer step ``step`` (0-based, counted over the whole run)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        # Same operation order as mmengine: base lr times the warm-up factor, then the decay.
        return self.lr * self.warmup_factor(step) * self.decay_factor(step)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
