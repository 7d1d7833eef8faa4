"""What a training run prints as it goes: progress bars or periodic lines, warnings, messages;
the optional TensorBoard log (``TensorBoardLog``); progress lines of eval / predict (``ProgressLines``).

Only rank 0 prints; ``quiet`` silences everything but warnings (proxy trainings of the search).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nasfpn.engine.coco_metrics import STAT_KEYS
from nasfpn.engine.step import LOSS_KEYS, StepResult

_PRINT_EVERY = 50  # steps between two progress lines when there is no progress bar
_ETA_WINDOW = 20  # recent steps the remaining time is estimated from
_PRINT_EVERY_ITEMS = 100  # images between two progress lines of eval / predict without a terminal


def fmt_time(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour on."""
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def bad_step_message(step: int, result: StepResult, streak: int, total: int, limit: int) -> str:
    terms = ", ".join(f"{k}={v:.6g}" for k, v in result.losses().items())
    return (
        f"step {step}: non-finite loss or gradient ({terms}, grad_norm={result.grad_norm:.6g}); update skipped "
        f"({streak} in a row, {total} in total, stop after {limit} in a row)"
    )


def epoch_message(row: dict[str, Any], epochs: int, metrics: dict[str, Any] | None, elapsed: float) -> str:
    """The line printed after an epoch (or a stopped part of one), from its ``metrics.csv`` row."""
    metric_text = f" | AP {metrics['AP']:.3f} AP50 {metrics['AP50']:.3f} AP75 {metrics['AP75']:.3f}" if metrics else ""
    loss_text = f"loss {row['loss']:.4f}" if row["loss"] is not None else "no applied steps"
    return (
        f"epoch {row['epoch']}/{epochs}{'' if row['complete'] else ' (partial)'}: {loss_text} "
        f"lr {row['lr']:.4g} ({row['epoch_seconds']:.0f} s){metric_text} | elapsed {fmt_time(elapsed)}"
    )


class ProgressLines:
    """Progress as plain lines on stderr, for output that is not a terminal (piped, logged), where a
    tqdm bar is hidden: "what: done/total unit" every ``every`` items and at the end."""

    def __init__(self, what: str, total: int, every: int = _PRINT_EVERY_ITEMS, unit: str = "images") -> None:
        self.what, self.total, self.every, self.unit = what, total, max(1, every), unit
        self.done = 0
        self._start = time.time()

    def update(self, n: int) -> None:
        before, self.done = self.done, self.done + n
        if self.done // self.every > before // self.every or (self.done >= self.total > before):
            rate = self.done / max(time.time() - self._start, 1e-9)
            print(f"{self.what}: {self.done}/{self.total} {self.unit} ({rate:.1f}/s)", file=sys.stderr, flush=True)


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can write (the ``tensorboard`` package is installed)."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardLog:
    """``train.tensorboard``: the losses and lr of every step and the COCO metrics of every
    evaluation, as TensorBoard scalars in ``log_dir`` (``out_dir/tb``), beside ``log.jsonl`` and
    ``metrics.csv``, which stay. Off (nothing imported or written) when not ``enabled`` (ranks > 0).
    A resumed run drops the events of the steps it redoes (``purge_step``)."""

    def __init__(self, log_dir: Path, enabled: bool) -> None:
        self.log_dir = log_dir
        self.enabled = enabled
        self._writer: Any = None
        if enabled and not tensorboard_available():
            raise ValueError(
                "train.tensorboard is on but the tensorboard package is not installed; "
                "install it (pip install 'nasfpn[tensorboard]') or leave train.tensorboard off "
                "(log.jsonl and metrics.csv hold the same numbers)"
            )

    def _open(self, step: int) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir), purge_step=step)
        return self._writer

    def step(self, record: dict[str, Any]) -> None:
        """A ``log.jsonl`` line: its losses and lr at its step."""
        if not self.enabled:
            return
        writer = self._open(record["step"])
        for key in (*LOSS_KEYS, "lr", "grad_norm"):
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(f"train/{key}", value, record["step"])

    def evaluation(self, row: dict[str, Any]) -> None:
        """A ``metrics.csv`` row: its COCO statistics (when evaluated) at the row's step."""
        if not self.enabled:
            return
        # -1 marks an undefined statistic (no ground truth in that area range): left out of the plots.
        values = {k: row[k] for k in STAT_KEYS if isinstance(row.get(k), (int, float)) and row[k] >= 0}
        if values:
            writer = self._open(row["step"])
            for key, value in values.items():
                writer.add_scalar(f"val/{key}", value, row["step"])
            writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class Console:
    """Rank 0's output: ``log`` (stdout, or through tqdm while a bar is shown), ``warn``
    (stderr, also when quiet), one progress bar per epoch or a line every 50 steps."""

    def __init__(self, is_main: bool, quiet: bool, progress: bool | None) -> None:
        self.is_main = is_main
        self.quiet = quiet
        self.progress = (not quiet and sys.stderr.isatty()) if progress is None else (progress and not quiet)
        self._bar: Any = None
        self._step_times: list[float] = []
        self._last = 0.0

    def log(self, text: str) -> None:
        if self.is_main and not self.quiet:
            if self.progress:
                tqdm.write(text)
            else:
                print(text, flush=True)

    def warn(self, text: str) -> None:
        if self.is_main:
            print(f"warning: {text}", file=sys.stderr, flush=True)

    def start_epoch(self, epoch: int, epochs: int, done: int, total: int) -> None:
        """Before the first step of ``epoch`` (``done`` of its ``total`` steps already done)."""
        if self.progress and self.is_main:
            self._bar = tqdm(
                total=total, initial=done, desc=f"epoch {epoch + 1}/{epochs}", unit="it", dynamic_ncols=True, leave=True
            )
        self._last = time.time()

    def step(
        self,
        result: StepResult | None,
        epoch: int,
        step: int,
        iter_in_epoch: int,
        iters_per_epoch: int,
        steps_left: int,
    ) -> None:
        """After a step (``step`` steps done in all; ``result`` None: the batch had no readable image)."""
        now = time.time()
        self._step_times.append(now - self._last)
        self._last = now
        if result is None:
            self.log(f"step {step - 1}: no readable image in this batch; skipped")
            return
        if self._bar is not None:
            recent = self._step_times[-_ETA_WINDOW:]
            remaining = steps_left * (sum(recent) / len(recent))
            self._bar.set_postfix_str(
                f"loss {result.loss:.4f} cls {result.loss_cls:.4f} "
                f"box {result.loss_bbox:.4f} lr {result.lr:.3g} "
                f"eta {fmt_time(remaining)}",
                refresh=False,
            )
            self._bar.update(1)
        elif step % _PRINT_EVERY == 0:
            self.log(
                f"epoch {epoch + 1} step {iter_in_epoch}/{iters_per_epoch}: loss {result.loss:.4f} "
                f"(cls {result.loss_cls:.4f}, box {result.loss_bbox:.4f}) lr {result.lr:.4g}"
            )

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
