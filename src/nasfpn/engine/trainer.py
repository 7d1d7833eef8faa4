"""Training: ``train(cfg, data, out_dir)`` runs a whole schedule and returns a ``TrainResult``.

The loop is a plain function over explicit objects (model, optimizer, scaler, data order):

- SGD, momentum 0.9; ``lr = base_lr * total_batch / base_batch_size`` (``engine.schedule``):
  linear warm-up by iteration, step decay by epoch, a pure function of the global step;
  weight decay 1e-4 except on norm layers (``engine.optim``).
- Data order is a function of ``(seed, epoch)`` and the augmentation of each sample a function of
  ``(seed, epoch, index)``, so a checkpoint only needs the step counters to resume exactly, also
  in the middle of an epoch (``--checkpoint-interval``).
- Deep supervision (``model.head.deep_supervision``, NAS-FPN only): the loss is the **mean** of
  the losses of the head run on the output of every stack, so its scale matches a single exit.
- A step whose loss is not finite (on any rank) is skipped: no update, BN running statistics
  restored; the terms are printed. ``train.max_bad_steps`` skipped steps in a row stop the run;
  the last checkpoint on disk is the last good one (a non-finite model is never written).
- Under ``torchrun`` the model is wrapped in DistributedDataParallel (gradients averaged over
  ranks; MMDetection's RetinaNet normalises its loss by the positives of each device, as here);
  ``train.sync_bn`` synchronises BatchNorm (``engine.distributed``); rank 0 writes every file.

Per step there is one host-device synchronisation: reading the loss terms (one small tensor,
all-reduced first under DDP), needed to decide whether the step is applied.

Files in ``out_dir``::

    config.yaml            the resolved config (classes taken from the training annotations)
    log.jsonl              one line per step: losses, lr, skipped
    metrics.csv            one row per epoch: mean losses, lr, COCO metrics of the epoch's evaluation
    last.pt / best.pt      training checkpoints (``engine.checkpoint``); best by box AP
    last.safetensors / best.safetensors   model weights with their config (``nasfpn eval/predict --weights``)
    loss.png / ap.png      curves
    summary.json           status, best and last metrics, wall time
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..config import Config, config_from_dict, config_to_dict, config_to_yaml
from . import distributed as D
from .checkpoint import (atomic_write_text, clean_state_dict, load_checkpoint, model_is_finite, rng_state,
                         save_checkpoint, set_rng_state)
from .schedule import LRSchedule, scaled_lr
from .step import LOSS_KEYS, StepResult, TrainStep, build_step_parts, train_step

__all__ = ["DataPaths", "TrainResult", "TrainStep", "train"]


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class DataPaths:
    """Where the training and validation data live (COCO-format annotation files + image folders).

    Without ``val_ann`` the run trains without evaluation (no best checkpoint, empty metrics).
    """

    train_ann: str | Path
    train_images: str | Path
    val_ann: str | Path | None = None
    val_images: str | Path | None = None

    @classmethod
    def from_root(cls, root: str | Path, require_train: bool = True) -> "DataPaths":
        """COCO 2017 (``annotations/instances_{train,val}2017.json``, ``{train,val}2017/``) or our
        synthetic layout (``annotations/instances_{train,val}.json``, ``train/``, ``val/``).

        ``require_train=False`` also accepts a folder with the validation split only (evaluation).
        """
        root = Path(root)
        layouts = [
            (root / "annotations" / "instances_train2017.json", root / "train2017",
             root / "annotations" / "instances_val2017.json", root / "val2017"),
            (root / "annotations" / "instances_train.json", root / "train",
             root / "annotations" / "instances_val.json", root / "val"),
        ]
        for train_ann, train_images, val_ann, val_images in layouts:
            if train_ann.is_file():
                has_val = val_ann.is_file()
                return cls(train_ann, train_images, val_ann if has_val else None, val_images if has_val else None)
            if not require_train and val_ann.is_file():
                return cls(train_ann, train_images, val_ann, val_images)
        raise ValueError(f"{root}: found neither COCO 2017 (annotations/instances_train2017.json + train2017/) nor "
                         "annotations/instances_train.json + train/; pass --train-ann/--train-images instead")


@dataclass
class TrainResult:
    """What a finished (or stopped) run gives back."""

    out_dir: Path
    status: str
    """"completed", "diverged" (too many non-finite losses), "time_limit" or "max_steps"."""
    message: str
    epochs: int
    """Epochs completed."""
    steps: int
    """Optimizer iterations done (skipped ones included)."""
    wall_time: float
    """Seconds spent in this call (data checks, training and evaluation)."""
    last_metrics: dict[str, Any] = field(default_factory=dict)
    """COCO metrics of the last evaluation (``AP``, ``AP50``, ... , ``per_class``); empty without one."""
    best_metrics: dict[str, Any] = field(default_factory=dict)
    """Metrics of the evaluation with the highest ``AP``, plus ``epoch``."""
    best_epoch: int | None = None
    skipped_steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    config: Config | None = None
    """The resolved config (classes from the data)."""
    model: nn.Module | None = field(default=None, repr=False)
    """The trained model (unwrapped, on its device) as it is at the end of the run."""

    @property
    def ok(self) -> bool:
        return self.status != "diverged"


class TrainingDiverged(RuntimeError):
    pass


# --------------------------------------------------------------------------- helpers


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _set_determinism(cfg: Config, device: torch.device) -> Callable[[], None]:
    """Apply ``train.deterministic``; returns a function restoring the previous global settings.

    On CUDA this selects deterministic kernels (cuDNN, cuBLAS, scatter/index ops). CPU kernels give
    the same results run to run for a fixed thread count already, and PyTorch's deterministic mode
    only slows them down (about 2x on convolution backward), so it is not switched on there.
    """
    prev_alg = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_bench = torch.backends.cudnn.benchmark
    prev_det = torch.backends.cudnn.deterministic
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    if cfg.train.deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: a few CUDA backward kernels (nearest upsampling) have no deterministic version.
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Filling every new tensor with NaN (a debugging aid of deterministic mode) costs time only.
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def restore() -> None:
        torch.use_deterministic_algorithms(prev_alg, warn_only=prev_warn)
        torch.backends.cudnn.benchmark = prev_bench
        torch.backends.cudnn.deterministic = prev_det
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill

    return restore


def _classes_from_dataset(cfg: Config, dataset) -> Config:
    """The config with the dataset's class count, names and category ids (saved with the weights)."""
    m = cfg.model
    return replace(
        cfg,
        model=replace(m, head=replace(m.head, num_classes=dataset.num_classes)),
        data=replace(cfg.data, class_names=tuple(dataset.class_names),
                     category_ids=tuple(int(c) for c in dataset.label_to_category_id)),
    )


def _dict_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _dict_diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [f"{prefix}: {a!r} -> {b!r}"]


def _bad_step_message(step: int, values: dict[str, float], streak: int, total: int, limit: int) -> str:
    terms = ", ".join(f"{k}={values[k]:.6g}" for k in LOSS_KEYS)
    extra = f", grad_norm={values['grad_norm']:.6g}" if "grad_norm" in values else ""
    return (f"step {step}: non-finite loss or gradient ({terms}{extra}); update skipped "
            f"({streak} in a row, {total} in total, stop after {limit} in a row)")


class _Writer:
    """Files of a run, written by rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool) -> None:
        self.out_dir = out_dir
        self.enabled = enabled
        self._log_lines: list[str] = []

    def config(self, cfg: Config) -> None:
        if self.enabled:
            atomic_write_text(config_to_yaml(cfg), self.out_dir / "config.yaml")

    def step(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self._log_lines.append(json.dumps(record))
            if len(self._log_lines) >= 50:
                self.flush()

    def flush(self) -> None:
        if self.enabled and self._log_lines:
            with open(self.out_dir / "log.jsonl", "a") as f:
                f.write("\n".join(self._log_lines) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._log_lines = []

    def truncate_log(self, step: int) -> list[dict[str, Any]]:
        """Keep the log lines of steps before ``step`` (a resumed run redoes the rest); return them."""
        path = self.out_dir / "log.jsonl"
        kept: list[dict[str, Any]] = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if rec.get("step", step) < step:
                    kept.append(rec)
        if self.enabled:
            atomic_write_text("".join(json.dumps(r) + "\n" for r in kept), path)
        return kept

    def metrics_csv(self, history: list[dict[str, Any]]) -> None:
        if not self.enabled or not history:
            return
        from ..eval.coco import STAT_KEYS

        cols = ["epoch", "step", "lr", "loss", "loss_cls", "loss_bbox", "skipped_steps", "epoch_seconds", *STAT_KEYS]
        lines = [",".join(cols)]
        for row in history:
            vals = []
            for c in cols:
                v = row.get(c)
                vals.append("" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v)))
            lines.append(",".join(vals))
        atomic_write_text("\n".join(lines) + "\n", self.out_dir / "metrics.csv")

    def plots(self, step_log: list[dict[str, Any]], history: list[dict[str, Any]]) -> None:
        if not self.enabled:
            return
        try:
            _plot_curves(self.out_dir, step_log, history)
        except Exception as e:  # plotting must never stop a run
            print(f"warning: could not draw curves: {e}", file=sys.stderr)


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc, q = [], 0.0, []
    for v in values:
        q.append(v)
        acc += v
        if len(q) > window:
            acc -= q.pop(0)
        out.append(acc / len(q))
    return out


def _plot_curves(out_dir: Path, step_log: list[dict[str, Any]], history: list[dict[str, Any]]) -> None:
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


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# --------------------------------------------------------------------------- train


def train(cfg: Config, data: DataPaths, out_dir: str | Path, resume: bool = False, device: str | None = None, *,
          checkpoint_interval: int = 0, skip_invalid: bool = False, quiet: bool = False,
          progress: bool | None = None, max_steps: int | None = None, time_limit: float | None = None,
          check_images: bool = True) -> TrainResult:
    """Train ``cfg`` on ``data``, writing everything into ``out_dir``; returns a ``TrainResult``.

    ``cfg``: the model / data / schedule (``model.head.num_classes``, ``data.class_names`` and
    ``data.category_ids`` are replaced by the training annotations' categories; a non-empty
    ``data.category_ids`` selects and orders them instead). ``resume``: continue from
    ``out_dir/last.pt`` if it exists (else start afresh). ``device``: "cpu", "cuda", "cuda:N" or
    None (CUDA if available). ``checkpoint_interval``: also write ``last.pt`` every this many
    steps (0: at epoch ends only). ``skip_invalid``: train without the images and annotations that
    the data check flags as errors instead of failing. ``quiet``: no printing at all (proxy
    trainings). ``progress``: progress bars (default: when stderr is a terminal and not quiet).
    ``max_steps`` (global step count) / ``time_limit`` (seconds of this call): stop early, at a
    step boundary, then checkpoint and evaluate. Under ``torchrun`` every process calls this; rank 0 writes the files and gets
    the metrics (other ranks get a result with empty metrics).

    Raises ``ValueError`` for bad data (the data-check report) or a checkpoint that does not fit.
    """
    start_time = time.time()
    info = D.init_distributed(device)
    restore = _set_determinism(cfg, info.device)
    try:
        return _Run(cfg, data, Path(out_dir), resume, info, checkpoint_interval, skip_invalid, quiet, progress,
                    max_steps, time_limit, check_images, start_time).run()
    finally:
        restore()
        D.cleanup(info)


class _Run:
    def __init__(self, cfg: Config, data: DataPaths, out_dir: Path, resume: bool, info: D.DistInfo,
                 checkpoint_interval: int, skip_invalid: bool, quiet: bool, progress: bool | None,
                 max_steps: int | None, time_limit: float | None, check_images: bool, start_time: float) -> None:
        self.cfg = cfg
        self.data = data
        self.out_dir = out_dir
        self.resume = resume
        self.info = info
        self.device = info.device
        self.checkpoint_interval = max(0, int(checkpoint_interval))
        self.skip_invalid = skip_invalid
        self.quiet = quiet
        self.progress = (not quiet and sys.stderr.isatty()) if progress is None else (progress and not quiet)
        self.max_steps = max_steps
        self.time_limit = time_limit
        self.check_images = check_images
        self.start_time = start_time
        self.writer = _Writer(out_dir, info.is_main)

    # ------------------------------------------------------------------ output
    def log(self, text: str) -> None:
        if self.info.is_main and not self.quiet:
            if self.progress:
                from tqdm import tqdm

                tqdm.write(text)
            else:
                print(text, flush=True)

    def warn(self, text: str) -> None:
        if self.info.is_main:
            print(f"warning: {text}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ setup
    def _check_data(self) -> tuple[list, list]:
        """Data checks on rank 0, shared with the other ranks; raises the report on errors."""
        from ..data.checks import DataCheckError, validate_dataset

        result: Any = None
        if self.info.is_main:
            try:
                train_problems = validate_dataset(self.data.train_ann, self.data.train_images, self.skip_invalid,
                                                  check_images=self.check_images, progress=self.progress)
                val_problems = []
                if self.data.val_ann is not None:
                    val_problems = validate_dataset(self.data.val_ann, self.data.val_images, True,
                                                    check_images=self.check_images, progress=self.progress)
                result = ("ok", train_problems, val_problems)
            except DataCheckError as e:
                result = ("error", str(e), [])
        result = D.broadcast_object(result)
        if result[0] == "error":
            raise ValueError(f"training data {self.data.train_ann} has problems:\n{result[1]}")
        if result[1]:
            self.log(f"data check: {len(result[1])} problem(s) in the training data; "
                     f"{'skipping the invalid items' if self.skip_invalid else 'warnings only'}")
        if result[2]:
            self.log(f"data check: {len(result[2])} problem(s) in the validation data (unreadable images are skipped)")
        return result[1], result[2]

    def _datasets(self, train_problems: list) -> None:
        from ..data.coco import CocoDataset
        from ..data.transforms import TrainTransform

        d = self.cfg.data
        self.train_ds = CocoDataset(
            self.data.train_ann, self.data.train_images,
            TrainTransform(d.image_size, tuple(d.scale_range), d.flip_prob),
            category_ids=list(d.category_ids) or None, filter_empty=True, exclude=train_problems,
            seed=self.cfg.train.seed, on_read_error="resample",
        )
        if len(self.train_ds) == 0:
            raise ValueError(f"{self.data.train_ann}: no training image with a usable box")
        self.cfg = _classes_from_dataset(self.cfg, self.train_ds)
        self.val_ds = None
        if self.data.val_ann is not None:
            from .evaluate import build_eval_dataset

            if self.data.val_images is None:
                raise ValueError("val_ann is given without val_images")
            self.val_ds = build_eval_dataset(self.data.val_ann, self.data.val_images, self.cfg,
                                             self.cfg.data.category_ids)

    def _load_resume_state(self) -> dict[str, Any] | None:
        path = self.out_dir / "last.pt"
        if not self.resume:
            if self.info.is_main and path.is_file():
                raise ValueError(f"{self.out_dir} already holds a run (last.pt); resume it (--resume) "
                                 "or choose another output folder")
            return None
        if not path.is_file():
            self.log(f"no checkpoint in {self.out_dir}: starting a new run")
            return None
        ckpt = load_checkpoint(path)
        saved = config_from_dict(ckpt["config"])
        diff = _dict_diff(config_to_dict(saved.model), config_to_dict(self.cfg.model))
        if diff:
            raise ValueError(f"{path} was trained with another model config:\n  " + "\n  ".join(diff))
        changed = _dict_diff(config_to_dict(saved.train), config_to_dict(self.cfg.train)) + \
            _dict_diff(config_to_dict(saved.data), config_to_dict(self.cfg.data))
        if changed:
            self.log("resuming with changed settings:\n  " + "\n  ".join(changed))
        return ckpt

    def _build(self, ckpt: dict[str, Any] | None) -> None:
        from ..models import build_model

        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        model = build_model(cfg.model, pretrained_backbone=ckpt is None)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"], strict=True)
        model.to(self.device)
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        if cfg.train.sync_bn:
            if self.info.distributed:
                group = torch.distributed.new_group() if self.device.type != "cuda" else None
                model = D.convert_sync_batchnorm(model, self.device, group)
            else:
                self.log("sync_bn: single process, BatchNorm left as is")
        self.model = model
        total_batch = cfg.data.batch_size * self.info.world_size
        self.lr = scaled_lr(cfg.train.base_lr, cfg.train.base_batch_size, total_batch)
        self.iters_per_epoch = D.iters_per_epoch(len(self.train_ds), cfg.data.batch_size, self.info.world_size)
        self.schedule = LRSchedule.from_config(cfg.train, self.lr, self.iters_per_epoch)
        self.parts = build_step_parts(model, cfg.train, self.schedule(0), cfg.model.head.deep_supervision,
                                      self.info.world_size)
        self.optimizer, self.scaler = self.parts.optimizer, self.parts.scaler
        if self.info.distributed:
            # Buffers (BN running statistics) stay per rank during training, as in mmengine's DDP
            # wrapper; with sync_bn they are identical anyway.
            import inspect

            ddp = nn.parallel.DistributedDataParallel
            no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                       else {"broadcast_buffers": False})
            self.parts.loss_module = ddp(self.parts.loss_module,
                                         device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                         find_unused_parameters=False, **no_sync)

        self.step = 0
        self.epoch = 0
        self.iter_in_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}
        self.skipped_total = 0
        self.elapsed_before = 0.0
        if ckpt is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt.get("scaler") and self.scaler.is_enabled():
                self.scaler.load_state_dict(ckpt["scaler"])
            self.step = int(ckpt["step"])
            self.epoch = int(ckpt["epoch"])
            self.iter_in_epoch = int(ckpt["iter_in_epoch"])
            self.history = list(ckpt.get("history", []))
            self.best = dict(ckpt.get("best", {}))
            counters = ckpt.get("counters", {})
            self.skipped_total = int(counters.get("skipped_steps", 0))
            self.elapsed_before = float(counters.get("wall_time", 0.0))
            set_rng_state(ckpt["rng"])
            if ckpt["data"]["iters_per_epoch"] != self.iters_per_epoch:
                raise ValueError(f"the checkpoint was written with {ckpt['data']['iters_per_epoch']} steps per epoch, "
                                 f"this run has {self.iters_per_epoch} (batch size, world size or data changed)")

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict[str, Any]:
        return {
            "config": config_to_dict(self.cfg),
            "model": clean_state_dict(self.model.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "step": self.step,
            "epoch": self.epoch,
            "iter_in_epoch": self.iter_in_epoch,
            "rng": rng_state(),
            "data": {"seed": self.cfg.train.seed, "batch_size": self.cfg.data.batch_size,
                     "world_size": self.info.world_size, "iters_per_epoch": self.iters_per_epoch,
                     "num_train_images": len(self.train_ds)},
            "history": self.history,
            "best": self.best,
            "counters": {"skipped_steps": self.skipped_total, "wall_time": self.elapsed()},
        }

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.start_time

    def save(self, best: bool = False, weights: bool = True) -> None:
        if not self.info.is_main:
            return
        from ..interop.weights import save_safetensors

        state = self._state()
        if not model_is_finite(state["model"]):
            self.warn("the model holds non-finite values: checkpoint not written (the previous one is kept)")
            return
        self.writer.flush()
        save_checkpoint(state, self.out_dir / "last.pt")
        if weights:
            save_safetensors(state["model"], self.out_dir / "last.safetensors", state["config"])
        if best:
            _copy_atomic(self.out_dir / "last.pt", self.out_dir / "best.pt")
            if weights:
                _copy_atomic(self.out_dir / "last.safetensors", self.out_dir / "best.safetensors")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, Any] | None:
        from .evaluate import evaluate_model

        if self.val_ds is None:
            return None
        metrics, _ = evaluate_model(self.model, self.cfg, self.data.val_ann, self.data.val_images, self.device,
                                    self.cfg.data.batch_size, self.cfg.data.workers, dataset=self.val_ds,
                                    progress=self.progress, channels_last=self.cfg.train.channels_last,
                                    amp=self.cfg.train.amp)
        return metrics

    # ------------------------------------------------------------------ run
    def run(self) -> TrainResult:
        cfg0 = self.cfg
        train_problems, _ = self._check_data()
        self._datasets(train_problems)
        if self.info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        D.barrier()
        ckpt = self._load_resume_state()
        self._build(ckpt)
        self.writer.config(self.cfg)
        step_log = self.writer.truncate_log(self.step) if ckpt is not None else []
        if ckpt is None and self.info.is_main:
            (self.out_dir / "log.jsonl").unlink(missing_ok=True)

        cfg = self.cfg
        if cfg.model.head.num_classes != cfg0.model.head.num_classes:
            self.log(f"classes: {cfg.model.head.num_classes} from {self.data.train_ann} "
                     f"({', '.join(cfg.data.class_names[:10])}{', ...' if len(cfg.data.class_names) > 10 else ''})")
        world = self.info.world_size
        total_batch = cfg.data.batch_size * world
        self.log(f"lr = base_lr {cfg.train.base_lr:g} x total batch {total_batch} ({cfg.data.batch_size} x {world} "
                 f"process{'es' if world > 1 else ''}) / base batch {cfg.train.base_batch_size} = {self.lr:.6g}")
        total_steps = self.iters_per_epoch * cfg.train.epochs
        decay = ("cosine decay to 0" if cfg.train.lr_decay == "cosine" else
                 f"lr x{cfg.train.gamma:g} at epochs {', '.join(map(str, cfg.train.milestones)) or '-'}")
        self.log(f"{len(self.train_ds)} training images, {self.iters_per_epoch} steps per epoch, "
                 f"{cfg.train.epochs} epochs = {total_steps} steps; warm-up {cfg.train.warmup_iters} steps, "
                 f"{decay}; device {self.device}" + (f" x {world}" if world > 1 else ""))
        late = [m for m in cfg.train.milestones if m >= cfg.train.epochs and cfg.train.lr_decay == "step"]
        if late:
            self.log(f"note: lr milestones {late} lie beyond the last epoch ({cfg.train.epochs}) and never apply")
        if ckpt is not None:
            self.log(f"resumed from {self.out_dir / 'last.pt'}: epoch {self.epoch + 1}, step {self.step}")

        status, message = "completed", ""
        max_bad = cfg.train.max_bad_steps
        streak = 0
        step_times: list[float] = []
        last_metrics: dict[str, Any] = {}
        for r in reversed(self.history):
            if r.get("AP") is not None:
                last_metrics = dict(r.get("metrics", {}))
                break
        stop = False
        loader = None
        while self.epoch < cfg.train.epochs and not stop:
            epoch = self.epoch
            batches = D.epoch_batches(len(self.train_ds), cfg.data.batch_size, cfg.train.seed, epoch,
                                      self.info.rank, world)[self.iter_in_epoch:]
            if loader is None:
                # One loader for the whole run: its workers stay alive across epochs (the batch list is
                # read in this process at each new pass, so it can change from epoch to epoch).
                from ..fast import loader_settings

                from ..data.collate import train_collate

                sampler = D.BatchList(batches)
                loader = torch.utils.data.DataLoader(self.train_ds, batch_sampler=sampler,
                                                     collate_fn=train_collate(cfg.data),
                                                     **loader_settings(self.device, cfg.data.workers))
            sampler.batches = batches
            epoch_start = time.time()
            sums = {k: 0.0 for k in LOSS_KEYS}
            counted = 0
            skipped_epoch = 0
            bar = None
            if self.progress and self.info.is_main:
                from tqdm import tqdm

                bar = tqdm(total=self.iters_per_epoch, initial=self.iter_in_epoch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                           unit="it", dynamic_ncols=True, leave=True)
            self.model.train()
            t_prev = time.time()
            for batch in loader:
                values, applied = self._train_one(batch)
                self.step += 1
                self.iter_in_epoch += 1
                now = time.time()
                step_times.append(now - t_prev)
                t_prev = now
                if values is None:
                    self.log(f"step {self.step - 1}: no readable image in this batch; skipped")
                    continue
                record = {"step": self.step - 1, "epoch": epoch, "iter": self.iter_in_epoch - 1,
                          "lr": values["lr"], **{k: values[k] for k in LOSS_KEYS},
                          "num_pos": values["num_pos"], "grad_norm": values["grad_norm"], "skipped": not applied}
                self.writer.step(record)
                step_log.append(record)
                if applied:
                    streak = 0
                    counted += 1
                    for k in LOSS_KEYS:
                        sums[k] += values[k]
                else:
                    streak += 1
                    skipped_epoch += 1
                    self.skipped_total += 1
                    self.warn(_bad_step_message(self.step - 1, values, streak, self.skipped_total, max_bad))
                    if streak >= max_bad:
                        status = "diverged"
                        message = (f"training stopped: {streak} non-finite losses in a row (last at step "
                                   f"{self.step - 1}); the last good checkpoint is {self.out_dir / 'last.pt'}. "
                                   "Lower the learning rate, enable --grad-clip, or check the data.")
                        stop = True
                        break
                if bar is not None:
                    recent = step_times[-20:]
                    remaining = (total_steps - self.step) * (sum(recent) / len(recent))
                    bar.set_postfix_str(f"loss {values['loss']:.4f} cls {values['loss_cls']:.4f} "
                                        f"box {values['loss_bbox']:.4f} lr {values['lr']:.3g} "
                                        f"eta {_fmt_time(remaining)}", refresh=False)
                    bar.update(1)
                elif self.info.is_main and not self.quiet and (self.step % 50 == 0):
                    self.log(f"epoch {epoch + 1} step {self.iter_in_epoch}/{self.iters_per_epoch}: "
                             f"loss {values['loss']:.4f} (cls {values['loss_cls']:.4f}, box {values['loss_bbox']:.4f}) "
                             f"lr {values['lr']:.4g}")
                finished_epoch = self.iter_in_epoch >= self.iters_per_epoch
                if values.get("stop"):
                    status, stop = "time_limit", True
                    message = f"time limit of {self.time_limit:.0f} s reached at step {self.step}"
                if self.max_steps is not None and self.step >= self.max_steps:
                    status, stop = "max_steps", True
                    message = f"stopped after max_steps={self.max_steps}"
                if stop:
                    break
                if self.checkpoint_interval and self.step % self.checkpoint_interval == 0 and not finished_epoch:
                    self.save(weights=False)
            if bar is not None:
                bar.close()
            if status == "diverged":
                break
            epoch_done = self.iter_in_epoch >= self.iters_per_epoch
            if epoch_done:
                self.epoch += 1
                self.iter_in_epoch = 0
            evaluate_now = epoch_done and ((epoch + 1) % max(1, cfg.train.eval_interval) == 0
                                           or epoch + 1 == cfg.train.epochs)
            if stop:
                evaluate_now = True  # a stopped run still reports where it got
            metrics = self.evaluate() if evaluate_now else None
            if not epoch_done and not evaluate_now:
                continue
            # Means over every step of the epoch, including those before a resume (from log.jsonl).
            done = [r for r in step_log if r.get("epoch") == epoch]
            good = [r for r in done if not r.get("skipped")]
            if len(good) < counted:  # the log was not available (another rank): this call's steps
                good = []
            row: dict[str, Any] = {
                "epoch": epoch + 1, "step": self.step, "lr": self.schedule(max(self.step - 1, 0)),
                **{k: (sum(r[k] for r in good) / len(good) if good else (sums[k] / counted if counted else None))
                   for k in LOSS_KEYS},
                "skipped_steps": max(skipped_epoch, len(done) - len(good)),
                "epoch_seconds": round(time.time() - epoch_start, 2), "complete": epoch_done,
            }
            is_best = False
            if metrics is not None:
                from .evaluate import to_numpy_metrics

                row.update(to_numpy_metrics(metrics))
                row["metrics"] = {k: v for k, v in metrics.items()}
                last_metrics = dict(metrics)
                if not self.best or metrics["AP"] > self.best.get("AP", -1.0):
                    self.best = {**metrics, "epoch": epoch + 1}
                    is_best = True
            if self.history and self.history[-1]["epoch"] == row["epoch"]:
                self.history[-1] = row  # a stopped partial epoch, then finished after a resume
            else:
                self.history.append(row)
            if self.info.is_main:
                from ..eval.coco import write_metrics_json

                metric_text = (f" | AP {metrics['AP']:.3f} AP50 {metrics['AP50']:.3f} AP75 {metrics['AP75']:.3f}"
                               if metrics else "")
                loss_text = f"loss {row['loss']:.4f}" if row["loss"] is not None else "no applied steps"
                self.log(f"epoch {epoch + 1}/{cfg.train.epochs}{'' if epoch_done else ' (partial)'}: {loss_text} "
                         f"lr {row['lr']:.4g} ({row['epoch_seconds']:.0f} s){metric_text}"
                         f" | elapsed {_fmt_time(self.elapsed())}")
                self.writer.metrics_csv(self.history)
                if metrics is not None or stop or self.epoch >= cfg.train.epochs:
                    self.writer.plots(step_log, self.history)  # ~1 s of CPU: not after every epoch
                if metrics is not None:
                    write_metrics_json(metrics, self.out_dir / "metrics.json")
            self.save(best=is_best)
        self.writer.flush()

        if status == "diverged":
            self.warn(message)
        elif self.info.is_main and not self.quiet and status == "completed":
            self.log(f"done: {self.epoch} epochs, {self.step} steps in {_fmt_time(self.elapsed())}"
                     + (f"; best AP {self.best['AP']:.3f} (epoch {self.best['epoch']})" if self.best else ""))
        result = TrainResult(
            out_dir=self.out_dir, status=status, message=message, epochs=self.epoch, steps=self.step,
            wall_time=time.time() - self.start_time,
            last_metrics=last_metrics if self.info.is_main else {},
            best_metrics=dict(self.best) if self.info.is_main else {},
            best_epoch=self.best.get("epoch") if self.best else None,
            skipped_steps=self.skipped_total,
            history=[{k: v for k, v in r.items() if k != "metrics"} for r in self.history],
            config=self.cfg,
            model=self.model,
        )
        if self.info.is_main:
            from ..eval.coco import write_metrics_json

            write_metrics_json({"status": status, "message": message, "epochs": result.epochs, "steps": result.steps,
                                "wall_time": result.wall_time, "skipped_steps": result.skipped_steps,
                                "best_epoch": result.best_epoch, "best": result.best_metrics,
                                "last": result.last_metrics}, self.out_dir / "summary.json")
        return result

    def _train_one(self, batch) -> tuple[dict[str, Any] | None, bool]:
        """One optimizer step; returns the step's values (averaged over ranks) and whether it was applied."""
        if batch is None:
            return None, False
        result: StepResult = train_step(self.parts, batch, self.schedule(self.step), stop=self._over_time)
        return asdict(result), result.applied

    def _over_time(self) -> bool:
        return (self.time_limit is not None and self.info.is_main
                and time.time() - self.start_time > self.time_limit)
