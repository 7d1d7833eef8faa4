"""The files of a training run in its output folder, written by rank 0 only::

    config.yaml            the resolved config (classes taken from the training annotations)
    log.jsonl              one line per step: losses, lr, skipped
    metrics.csv            one row per epoch: mean losses, lr, COCO metrics of the epoch's evaluation
    metrics.json           the last evaluation's metrics
    last.pt / best.pt      training checkpoints (``engine.checkpoint``); best by box AP
    last.prev.pt           the checkpoint last.pt replaced (kept while the run is not finished)
    last.checksums.json    size and sha256 of last.pt and last.prev.pt, checked on resume
    last.safetensors / best.safetensors   model weights with their config (``nasfpn eval/predict --weights``)
    loss.png / ap.png      curves
    summary.json           status, best and last metrics, wall time

Every file is replaced atomically (temporary name, then ``os.replace``), except ``log.jsonl``,
which is appended to in blocks and cut back to the checkpoint's step on resume.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from nasfpn.core.config import Config, config_to_yaml
from nasfpn.core.fileio import copy_atomic, write_text_atomic
from nasfpn.core.weights import save_safetensors
from nasfpn.engine.checkpoint import discard_previous, model_is_finite, save_checkpoint, writing
from nasfpn.engine.coco_metrics import STAT_KEYS, write_metrics_json
from nasfpn.engine.step import LOSS_KEYS, StepResult

_LOG_BLOCK = 50  # log lines kept in memory before they are appended to log.jsonl


class RunFiles:
    """Writes the files of a run into ``out_dir``; does nothing when not ``enabled`` (ranks > 0)."""

    def __init__(self, out_dir: Path, enabled: bool) -> None:
        self.out_dir = out_dir
        self.enabled = enabled
        self._log_lines: list[str] = []

    def config(self, cfg: Config) -> None:
        if self.enabled:
            write_text_atomic(config_to_yaml(cfg), self.out_dir / "config.yaml")

    # ------------------------------------------------------------------ log.jsonl
    def start_log(self, resume_step: int | None) -> list[dict[str, Any]]:
        """A new run removes ``log.jsonl``; a resumed one keeps the lines of the steps before
        ``resume_step`` (it redoes the rest). Returns the lines kept (read on every rank)."""
        path = self.out_dir / "log.jsonl"
        if resume_step is None:
            if self.enabled:
                path.unlink(missing_ok=True)
            return []
        kept: list[dict[str, Any]] = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if rec.get("step", resume_step) < resume_step:
                    kept.append(rec)
        if self.enabled:
            write_text_atomic("".join(json.dumps(r) + "\n" for r in kept), path)
        return kept

    def step(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self._log_lines.append(json.dumps(record))
            if len(self._log_lines) >= _LOG_BLOCK:
                self.flush()

    def flush(self) -> None:
        if self.enabled and self._log_lines:
            with open(self.out_dir / "log.jsonl", "a") as f:
                f.write("\n".join(self._log_lines) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._log_lines = []

    # ------------------------------------------------------------------ results
    def metrics_csv(self, history: list[dict[str, Any]]) -> None:
        if not self.enabled or not history:
            return
        cols = [
            *("epoch", "step", "lr", "loss", "loss_cls", "loss_bbox", "skipped_steps", "epoch_seconds", "elapsed"),
            *STAT_KEYS,
        ]
        lines = [",".join(cols)]
        for row in history:
            vals = []
            for c in cols:
                v = row.get(c)
                vals.append("" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v)))
            lines.append(",".join(vals))
        write_text_atomic("\n".join(lines) + "\n", self.out_dir / "metrics.csv")

    def metrics_json(self, metrics: dict[str, Any]) -> None:
        self._json(metrics, "metrics.json")

    def summary(self, summary: dict[str, Any]) -> None:
        self._json(summary, "summary.json")

    def _json(self, obj: dict[str, Any], name: str) -> None:
        if self.enabled:
            write_metrics_json(obj, self.out_dir / name)

    def plots(self, step_log: list[dict[str, Any]], history: list[dict[str, Any]]) -> None:
        if not self.enabled:
            return
        try:
            plot_curves(self.out_dir, step_log, history)
        except Exception as e:  # plotting must never stop a run
            print(f"warning: could not draw curves: {e}", file=sys.stderr)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, state: dict[str, Any], best: bool = False, weights: bool = True) -> bool:
        """Write ``last.pt`` (the one it replaces kept as ``last.prev.pt``, both listed with their
        sha256 in ``last.checksums.json``), and ``last.safetensors`` with ``weights``; copies as
        ``best.*`` with ``best``. A model with non-finite values is not written (the previous files
        stay): False. ``CheckpointWriteError`` (file, reason, free space) when the disk is full."""
        if not self.enabled:
            return True
        if not model_is_finite(state["model"]):
            return False
        last = self.out_dir / "last.pt"
        with writing(self.out_dir / "log.jsonl"):
            self.flush()  # the log on disk reaches at least the checkpoint's step
        save_checkpoint(state, last)
        if weights:
            with writing(self.out_dir / "last.safetensors"):
                save_safetensors(state["model"], self.out_dir / "last.safetensors", state["config"])
        if best:
            with writing(self.out_dir / "best.pt"):
                copy_atomic(last, self.out_dir / "best.pt")
            if weights:
                with writing(self.out_dir / "best.safetensors"):
                    copy_atomic(self.out_dir / "last.safetensors", self.out_dir / "best.safetensors")
        return True

    def keep_last_only(self) -> None:
        """A finished run keeps its last checkpoint only (no ``last.prev.pt``)."""
        if self.enabled:
            discard_previous(self.out_dir / "last.pt")


def step_record(result: StepResult, step: int, epoch: int, iter_in_epoch: int) -> dict[str, Any]:
    """The ``log.jsonl`` line of a step."""
    return {
        "step": step,
        "epoch": epoch,
        "iter": iter_in_epoch,
        "lr": result.lr,
        **{k: getattr(result, k) for k in LOSS_KEYS},
        "num_pos": result.num_pos,
        "grad_norm": result.grad_norm,
        "skipped": not result.applied,
    }


# --------------------------------------------------------------------------- curves


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc, q = [], 0.0, []
    for v in values:
        q.append(v)
        acc += v
        if len(q) > window:
            acc -= q.pop(0)
        out.append(acc / len(q))
    return out


def plot_curves(out_dir: Path, step_log: list[dict[str, Any]], history: list[dict[str, Any]]) -> None:
    """``loss.png`` (applied steps, raw and smoothed) and ``ap.png`` (AP, AP50, AP75 per evaluated epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in step_log if not r.get("skipped") and all(math.isfinite(r.get(k, math.nan)) for k in LOSS_KEYS)]
    if good:
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [r["step"] for r in good]
        window = max(1, len(good) // 50)
        for key, colour in zip(LOSS_KEYS, ("k", "tab:blue", "tab:orange")):
            vals = [r[key] for r in good]
            ax.plot(steps, vals, color=colour, alpha=0.15, linewidth=0.8)
            ax.plot(steps, _smooth(vals, window), color=colour, label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
        ax.set_title("training loss")
        fig.tight_layout()
        fig.savefig(out_dir / "loss.png", dpi=100)
        plt.close(fig)
    evals = [r for r in history if r.get("AP") is not None]
    if evals:
        fig, ax = plt.subplots(figsize=(7, 4))
        epochs = [r["epoch"] for r in evals]
        for key in ("AP", "AP50", "AP75"):
            ax.plot(epochs, [r[key] for r in evals], marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel("box AP")
        ax.set_ylim(0, 1)
        ax.grid(True, alpha=0.3)
        ax.legend()
        ax.set_title("validation")
        fig.tight_layout()
        fig.savefig(out_dir / "ap.png", dpi=100)
        plt.close(fig)
