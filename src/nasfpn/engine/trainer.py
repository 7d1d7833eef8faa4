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
- A step whose loss is not finite (on any rank) is skipped (``engine.step``): no update, BN running
  statistics restored; the terms are printed. ``train.max_bad_steps`` skipped steps in a row stop
  the run; the last checkpoint on disk is the last good one (a non-finite model is never written).
- An unreadable image is replaced by another one (``data.coco``); a batch without any readable
  image (``data.collate``) is skipped, and its step still counts. A training image folder that is
  gone stops the run ("data_missing") instead of skipping every step that follows.
- Faults (``train(handle_signals=True)``, as ``nasfpn train`` runs): SIGTERM / SIGINT stop the run
  after the step in progress (a second one at once), checkpoint and return "interrupted"; the
  stop travels in the step's all-reduce, so every rank stops after the same step (rank 0 writes).
  A checkpoint write that fails (disk full) stops the run ("write_error"; the files already
  written stay); a DataLoader worker that dies (out-of-memory killer, ...) ends it with
  "worker_died". Each message names the last checkpoint; ``--resume`` continues from it, taking
  ``last.prev.pt`` when ``last.pt`` does not verify (``engine.checkpoint``).
- Under ``torchrun`` the model is wrapped in DistributedDataParallel (gradients averaged over
  ranks; MMDetection's RetinaNet normalises its loss by the positives of each device, as here);
  ``train.sync_bn`` synchronises BatchNorm (``engine.distributed``); rank 0 writes every file.

Where the pieces are: the step in ``engine.step``, the files of ``out_dir`` (config, step log,
metrics, checkpoints, curves) in ``engine.run_dir``, what is printed in ``engine.hooks``, the
kernel settings of ``train.deterministic`` in ``engine.determinism``.
"""

from __future__ import annotations

import errno
import inspect
import math
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nasfpn.core.config import Config, config_from_dict, config_to_dict
from nasfpn.data.checks import DataCheckError, validate_dataset
from nasfpn.data.coco import CocoDataset
from nasfpn.data.collate import loader_settings, train_collate
from nasfpn.data.transforms import TrainTransform
from nasfpn.engine import distributed as D
from nasfpn.engine.budget import FIRST_PLAN, REPLAN_EVERY, TimeBudget, estimate_eval_seconds
from nasfpn.engine.checkpoint import (
    CheckpointWriteError,
    load_resume_checkpoint,
    previous_path,
    rng_state,
    set_rng_state,
    write_error_message,
)
from nasfpn.engine.data_paths import DataPaths
from nasfpn.engine.determinism import set_determinism
from nasfpn.engine.ema import checkpoint_weights, training_weights
from nasfpn.engine.evaluate import build_eval_dataset, evaluate_model, to_numpy_metrics
from nasfpn.engine.finetune import Freezer, check_settings, transfer_weights
from nasfpn.engine.hooks import Console, TensorBoardLog, bad_step_message, epoch_message, fmt_time
from nasfpn.engine.run_dir import RunFiles, step_record
from nasfpn.engine.schedule import LRSchedule, scaled_lr
from nasfpn.engine.step import LOSS_KEYS, StepResult, TrainStep, build_step_parts, train_step
from nasfpn.models import RetinaNet, build_model

__all__ = ["DataPaths", "TrainResult", "TrainStep", "train"]


@dataclass
class TrainResult:
    """What a finished (or stopped) run gives back."""

    out_dir: Path
    status: str
    """"completed", "diverged" (too many non-finite losses), "time_limit", "max_steps", "interrupted"
    (SIGTERM / SIGINT, checkpointed), "write_error" (a checkpoint could not be written), "worker_died"
    (a DataLoader worker process ended) or "data_missing" (the training image folder is gone)."""
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
    """The trained model (unwrapped, on its device) as it is at the end of the run (with ``train.ema``: its EMA)."""
    signal: int | None = None
    """The signal that stopped an "interrupted" run."""

    @property
    def ok(self) -> bool:
        return self.status != "diverged"


Stop = tuple[str, str]
"""Why a run stops early: ``(status, message)``."""
_NO_EPOCH_END = ("diverged", "write_error", "worker_died", "data_missing")
"""Stops without the epoch's evaluation and checkpoint (the last good checkpoint stays the last one)."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM / SIGINT to the training process, which stops them itself
    after its checkpoint (a Ctrl-C reaches every process of the terminal's group)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class _Signals:
    """SIGTERM / SIGINT during training: noted, and the run stops after the step in progress; a
    second one stops at once (KeyboardInterrupt, or exit status 128 + signal for SIGTERM)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers belong to the main thread (a run in a thread keeps the defaults)
        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker inherited the handler: the training process decides
        name = signal.Signals(signum).name
        if self.received is not None:
            os.write(2, f"\n{name} again: stopping now; the last checkpoint written is kept\n".encode())
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.received = signum
        # os.write, not print: the handler may run while the main code is inside a print.
        os.write(2, f"\n{name} received: stopping after this step with a checkpoint ({name} again: at once)\n".encode())


_WORKER_DIED = "DataLoader worker (pid"


def stop_workers(loader: torch.utils.data.DataLoader) -> str | None:
    """Stop the loader's worker processes now; returns how a worker that had died ended
    (``"signal 9, SIGKILL"``, ``"exit code 1"``) or None.

    Now, not when the garbage collector gets to the loader: until its workers are shut down,
    PyTorch's SIGCHLD handler keeps their pids and raises its RuntimeError at any child's exit,
    anywhere in this process, this function included (hence the retries)."""
    iterator = None
    for _ in range(5):
        try:
            iterator = iterator or getattr(loader, "_iterator", None)
            loader._iterator = None
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if callable(shutdown):
                shutdown()  # drops the pids from PyTorch's list however it ends
            codes = [w.exitcode for w in getattr(iterator, "_workers", None) or []]
            break
        except RuntimeError as e:
            if worker_death(e) is None:
                raise
    else:
        return None
    # A worker that outlived the shutdown is terminated by it (SIGTERM): not the cause.
    dead = [c for c in codes if c and c != -signal.SIGTERM] or [c for c in codes if c]
    if not dead:
        return None
    code = dead[0]
    return f"signal {-code}, {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def worker_death(error: BaseException) -> str | None:
    """``"signal 9, SIGKILL"``, ``"exit code 1"``, ... when ``error`` is PyTorch's report of a
    DataLoader worker process that ended; None for any other error."""
    if not isinstance(error, RuntimeError) or _WORKER_DIED not in str(error):
        return None
    # "exited unexpectedly" often wraps the report of the SIGCHLD handler, which names the signal.
    chain: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = " ".join(str(e) for e in chain)
    found = re.search(r"killed by signal: ([^.]+)", text)
    if found:
        name = found.group(1).strip()
        sig = next((s for s in signal.Signals if signal.strsignal(s) == name), None)
        return f"signal {int(sig)}, {sig.name}" if sig is not None else f"signal: {name}"
    found = re.search(r"exit code (-?\d+)", text)
    return f"exit code {found.group(1)}" if found else "it exited unexpectedly"


def train(
    cfg: Config,
    data: DataPaths,
    out_dir: str | Path,
    resume: bool = False,
    device: str | None = None,
    *,
    checkpoint_interval: int = 0,
    skip_invalid: bool = False,
    quiet: bool = False,
    progress: bool | None = None,
    max_steps: int | None = None,
    time_limit: float | None = None,
    fit_to_time: bool = False,
    check_images: bool = True,
    handle_signals: bool = False,
) -> TrainResult:
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
    step boundary, then checkpoint and evaluate. ``fit_to_time`` (with ``time_limit``): plan the
    run to end, final evaluation included, within ``time_limit`` instead of being cut short by it:
    the schedule is compressed to the steps that fit, re-planned as the speed is measured
    (``engine.budget``); at most the configured epochs. Under ``torchrun`` every process calls this; rank 0 writes the files and gets
    the metrics (other ranks get a result with empty metrics). ``handle_signals``: SIGTERM and
    SIGINT stop the run after the step in progress with a checkpoint (status "interrupted"; the
    previous handlers are put back when the call returns).

    Raises ``ValueError`` for bad data (the data-check report), a checkpoint that does not fit, or
    no usable checkpoint to resume from.
    """
    start_time = time.time()
    signals = _Signals()
    if handle_signals:
        signals.install()
    try:
        info = D.init_distributed(device)
    except BaseException:
        signals.restore()
        raise
    restore = set_determinism(cfg.train.deterministic, info.device)
    try:
        return _Run(
            cfg,
            data,
            Path(out_dir),
            resume,
            info,
            checkpoint_interval,
            skip_invalid,
            quiet,
            progress,
            max_steps,
            time_limit,
            check_images,
            start_time,
            fit_to_time,
            signals if handle_signals else None,
        ).run()
    finally:
        signals.restore()
        restore()
        D.cleanup(info)


def _classes_from_dataset(cfg: Config, dataset) -> Config:
    """The config with the dataset's class count, names and category ids (saved with the weights)."""
    m = cfg.model
    return replace(
        cfg,
        model=replace(m, head=replace(m.head, num_classes=dataset.num_classes)),
        data=replace(
            cfg.data,
            class_names=tuple(dataset.class_names),
            category_ids=tuple(int(c) for c in dataset.label_to_category_id),
        ),
    )


def _dict_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _dict_diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [f"{prefix}: {a!r} -> {b!r}"]


@dataclass
class _EpochCounts:
    """This call's steps of the epoch in progress."""

    start: float = field(default_factory=time.time)
    applied: int = 0
    skipped: int = 0
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOSS_KEYS, 0.0))

    def add(self, result: StepResult) -> None:
        if result.applied:
            self.applied += 1
            for k in LOSS_KEYS:
                self.sums[k] += getattr(result, k)
        else:
            self.skipped += 1


def _epoch_row(
    epoch: int, step_log: list[dict[str, Any]], fallback: _EpochCounts, step: int, lr: float, complete: bool
) -> dict[str, Any]:
    """The ``metrics.csv`` row of ``epoch`` (0-based): means over every step of the epoch, also
    those before a resume (from ``log.jsonl``); ``fallback`` counts this call's steps only, for
    ranks that could not read the log."""
    done = [r for r in step_log if r.get("epoch") == epoch]
    good = [r for r in done if not r.get("skipped")]
    if len(good) < fallback.applied:  # the log was not available (another rank): this call's steps
        good = []
    means = {
        k: (
            sum(r[k] for r in good) / len(good)
            if good
            else (fallback.sums[k] / fallback.applied if fallback.applied else None)
        )
        for k in LOSS_KEYS
    }
    return {
        "epoch": epoch + 1,
        "step": step,
        "lr": lr,
        **means,
        "skipped_steps": max(fallback.skipped, len(done) - len(good)),
        "epoch_seconds": round(time.time() - fallback.start, 2),
        "complete": complete,
    }


class _Run:
    def __init__(
        self,
        cfg: Config,
        data: DataPaths,
        out_dir: Path,
        resume: bool,
        info: D.DistInfo,
        checkpoint_interval: int,
        skip_invalid: bool,
        quiet: bool,
        progress: bool | None,
        max_steps: int | None,
        time_limit: float | None,
        check_images: bool,
        start_time: float,
        fit_to_time: bool = False,
        signals: _Signals | None = None,
    ) -> None:
        self.cfg = cfg
        self.data = data
        self.out_dir = out_dir
        self.resume = resume
        self.info = info
        self.device = info.device
        self.checkpoint_interval = max(0, int(checkpoint_interval))
        self.skip_invalid = skip_invalid
        self.max_steps = max_steps
        self.time_limit = time_limit
        self.fit_to_time = fit_to_time and time_limit is not None
        self.check_images = check_images
        self.start_time = start_time
        self.console = Console(info.is_main, quiet, progress)
        self.files = RunFiles(out_dir, info.is_main)
        self.tb = TensorBoardLog(out_dir / "tb", info.is_main and cfg.train.tensorboard)
        self.signals = signals
        # Why this rank wants the run to stop: (status, message, signal); shared by the next step.
        self._stop_request: tuple[str, str, int | None] | None = None
        self._stop_signal: int | None = None
        self.resumed_from: Path | None = None
        self._saved: tuple[Path, int] | None = None  # the last checkpoint on disk and its step
        # Checked here, on every rank: (val_ann, val_images) or None.
        self.val_data = data.validation()

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        """Data checks, datasets, resume state, model and step parts, first files and lines."""
        requested = self.cfg
        check_settings(self.cfg.train)  # fine-tuning / EMA settings, before the data is read
        train_problems, _ = self._check_data()
        self._datasets(train_problems)
        if self.info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        D.barrier()
        ckpt = self._load_resume_state()
        self._build(ckpt)
        self.files.config(self.cfg)
        self.step_log = self.files.start_log(self.step if ckpt is not None else None)
        self.streak = 0  # non-finite steps in a row
        self.last_metrics: dict[str, Any] = next(
            (dict(r.get("metrics", {})) for r in reversed(self.history) if r.get("AP") is not None), {}
        )
        self._describe(requested, resumed=ckpt is not None)

    def _describe(self, requested: Config, resumed: bool) -> None:
        cfg, log, world = self.cfg, self.console.log, self.info.world_size
        if cfg.model.head.num_classes != requested.model.head.num_classes:
            names = cfg.data.class_names
            log(
                f"classes: {cfg.model.head.num_classes} from {self.data.train_ann} "
                f"({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})"
            )
        log(
            f"lr = base_lr {cfg.train.base_lr:g} x total batch {cfg.data.batch_size * world} ({cfg.data.batch_size} x "
            f"{world} process{'es' if world > 1 else ''}) / base batch {cfg.train.base_batch_size} = {self.lr:.6g}"
        )
        decay = (
            "cosine decay to 0"
            if cfg.train.lr_decay == "cosine"
            else f"lr x{cfg.train.gamma:g} at epochs {', '.join(map(str, cfg.train.milestones)) or '-'}"
        )
        log(
            f"{len(self.train_ds)} training images, {self.iters_per_epoch} steps per epoch, "
            f"{cfg.train.epochs} epochs = {self.iters_per_epoch * cfg.train.epochs} steps; warm-up "
            f"{cfg.train.warmup_iters} steps, {decay}; device {self.device}" + (f" x {world}" if world > 1 else "")
        )
        late = [m for m in cfg.train.milestones if m >= cfg.train.epochs and cfg.train.lr_decay == "step"]
        if self.budget is not None:
            log(
                f"time budget {fmt_time(self.budget.seconds)}: the schedule is fitted to the steps that fit "
                "(final evaluation included), re-planned as the run measures its speed"
            )
        if late:
            log(f"note: lr milestones {late} lie beyond the last epoch ({cfg.train.epochs}) and never apply")
        if cfg.train.ema:
            log(
                f"EMA of the weights: decay {cfg.train.ema:g}, warm-up {cfg.train.ema_tau:g} steps; "
                "the EMA is evaluated and saved"
            )
        if resumed:
            log(f"resumed from {self.resumed_from}: epoch {self.epoch + 1}, step {self.step}")
            if cfg.train.init_weights:
                log(f"train.init_weights {cfg.train.init_weights} not read: the weights come from the checkpoint")

    def _loader(self) -> tuple[torch.utils.data.DataLoader, D.BatchList]:
        """One loader for the whole run, and its batch list: the workers stay alive across epochs
        (the batch list is read in this process at each new pass, so it can change from epoch to
        epoch)."""
        batch_list = D.BatchList([])
        loader = torch.utils.data.DataLoader(
            self.train_ds,
            batch_sampler=batch_list,
            collate_fn=train_collate(self.cfg.data),
            worker_init_fn=_ignore_stop_signals if self.signals is not None else None,
            **loader_settings(self.device, self.cfg.data.workers),
        )
        return loader, batch_list

    def _check_data(self) -> tuple[list, list]:
        """Data checks on rank 0, shared with the other ranks; raises the report on errors."""
        result: Any = None
        if self.info.is_main:
            try:
                train_problems = validate_dataset(
                    self.data.train_ann,
                    self.data.train_images,
                    self.skip_invalid,
                    check_images=self.check_images,
                    progress=self.console.progress,
                )
                val_problems = []
                if self.val_data is not None:
                    val_ann, val_images = self.val_data
                    val_problems = validate_dataset(
                        val_ann, val_images, True, check_images=self.check_images, progress=self.console.progress
                    )
                result = ("ok", train_problems, val_problems)
            except DataCheckError as e:
                result = ("error", str(e), [])
        result = D.broadcast_object(result)
        if result[0] == "error":
            raise ValueError(f"training data {self.data.train_ann} has problems:\n{result[1]}")
        if result[1]:
            self.console.log(
                f"data check: {len(result[1])} problem(s) in the training data; "
                f"{'skipping the invalid items' if self.skip_invalid else 'warnings only'}"
            )
        if result[2]:
            self.console.log(
                f"data check: {len(result[2])} problem(s) in the validation data (unreadable images are skipped)"
            )
        return result[1], result[2]

    def _datasets(self, train_problems: list) -> None:
        d = self.cfg.data
        scale_lo, scale_hi = d.scale_range
        self.train_ds = CocoDataset(
            self.data.train_ann,
            self.data.train_images,
            TrainTransform(d.train_crop, (scale_lo, scale_hi), d.flip_prob),
            category_ids=list(d.category_ids) or None,
            filter_empty=True,
            exclude=train_problems,
            seed=self.cfg.train.seed,
            on_read_error="resample",
            cache_images=d.cache_images,
        )
        if len(self.train_ds) == 0:
            raise ValueError(f"{self.data.train_ann}: no training image with a usable box")
        self.cfg = _classes_from_dataset(self.cfg, self.train_ds)
        self.val_ds = None
        if self.val_data is not None:
            val_ann, val_images = self.val_data
            self.val_ds = build_eval_dataset(val_ann, val_images, self.cfg, self.cfg.data.category_ids)

    def _load_resume_state(self) -> dict[str, Any] | None:
        path = self.out_dir / "last.pt"
        prev = previous_path(path)
        if not self.resume:
            if self.info.is_main and (path.is_file() or prev.is_file()):
                raise ValueError(
                    f"{self.out_dir} already holds a run (last.pt); resume it (--resume) "
                    "or choose another output folder"
                )
            return None
        if not (path.is_file() or prev.is_file()):
            self.console.log(f"no checkpoint in {self.out_dir}: starting a new run")
            return None
        ckpt, used, bad = load_resume_checkpoint(path)  # ValueError when neither file is usable
        D.barrier()  # every rank has read its checkpoint
        for line in bad:
            self.console.warn(f"checkpoint {line}")
        if used != path:
            kept = path.with_name(path.name + ".bad")
            if self.info.is_main and path.is_file():
                # Out of the rotation: the next checkpoint must not keep it as last.prev.pt.
                os.replace(path, kept)
            self.console.warn(
                f"resuming from {used} (step {ckpt['step']}) instead"
                + (f"; the bad file is kept as {kept}" if kept.is_file() else "")
            )
        self.resumed_from = used
        self._saved = (used, int(ckpt["step"]))
        saved = config_from_dict(ckpt["config"])
        diff = _dict_diff(config_to_dict(saved.model), config_to_dict(self.cfg.model))
        if diff:
            raise ValueError(f"{path} was trained with another model config:\n  " + "\n  ".join(diff))
        changed = _dict_diff(config_to_dict(saved.train), config_to_dict(self.cfg.train)) + _dict_diff(
            config_to_dict(saved.data), config_to_dict(self.cfg.data)
        )
        if changed:
            self.console.log("resuming with changed settings:\n  " + "\n  ".join(changed))
        return ckpt

    def _build(self, ckpt: dict[str, Any] | None) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        # Fine-tuning weights replace the ImageNet ones: no need to fetch those first.
        model = build_model(cfg.model, pretrained_backbone=ckpt is None and not cfg.train.init_weights)
        if ckpt is not None:
            model.load_state_dict(training_weights(ckpt), strict=True)
        elif cfg.train.init_weights:  # a resumed run has its weights in the checkpoint
            transfer_weights(model, cfg, self.console.log)
        model.to(self.device)
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        if cfg.train.sync_bn:
            if self.info.distributed:
                group = torch.distributed.new_group() if self.device.type != "cuda" else None
                synced = D.convert_sync_batchnorm(model, self.device, group)
                assert isinstance(synced, RetinaNet)  # only the BatchNorm modules in it are replaced
                model = synced
            else:
                self.console.log("sync_bn: single process, BatchNorm left as is")
        self.model = model
        self.freezer = Freezer(model, cfg.train.freeze) if cfg.train.freeze else None
        total_batch = cfg.data.batch_size * self.info.world_size
        self.lr = scaled_lr(cfg.train.base_lr, cfg.train.base_batch_size, total_batch)
        self.iters_per_epoch = D.iters_per_epoch(len(self.train_ds), cfg.data.batch_size, self.info.world_size)
        self.schedule = LRSchedule.from_config(cfg.train, self.lr, self.iters_per_epoch)
        if ckpt is not None and ckpt.get("plan"):
            self.schedule = self.schedule.fit(int(ckpt["plan"]["total_iters"]))
        self._shown_plan = self.planned_iters
        self.budget: TimeBudget | None = None
        if self.fit_to_time:
            assert self.time_limit is not None
            self.budget = TimeBudget(
                self.time_limit, self.schedule.full_iters, self.iters_per_epoch, cfg.train.eval_interval
            )
        self.parts = build_step_parts(
            model, cfg.train, self.schedule(0), cfg.model.head.deep_supervision, self.info.world_size
        )
        self.optimizer, self.scaler = self.parts.optimizer, self.parts.scaler
        if self.info.distributed:
            self._wrap_ddp()

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
            if self.parts.ema is not None:
                self.parts.ema.load(ckpt)
            if ckpt["data"]["iters_per_epoch"] != self.iters_per_epoch:
                raise ValueError(
                    f"the checkpoint was written with {ckpt['data']['iters_per_epoch']} steps per epoch, "
                    f"this run has {self.iters_per_epoch} (batch size, world size or data changed)"
                )

    def _wrap_ddp(self) -> None:
        """(Re)wrap the step's module in DistributedDataParallel, which reduces the gradients of the
        parameters that needed one when it was built (again when ``train.freeze`` thaws a part)."""
        module = self.parts.loss_module
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        # Buffers (BN running statistics) stay per rank during training, as in mmengine's DDP
        # wrapper; with sync_bn they are identical anyway.
        ddp = nn.parallel.DistributedDataParallel
        no_sync: dict[str, Any] = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(ddp).parameters
            else {"broadcast_buffers": False}
        )
        self.parts.loss_module = ddp(
            module,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=False,
            **no_sync,
        )

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        self._setup()
        self.train_seconds = 0.0  # this call's time in training steps (loading included), for the budget
        self.steps_this_call = 0
        self._mark = time.time()
        loader, batch_list = self._loader()
        status, message = "completed", ""
        try:
            while self.epoch < self.cfg.train.epochs:
                epoch = self.epoch
                stop = self._train_epoch(loader, batch_list, epoch)
                if stop is not None and stop[0] == "interrupted":
                    message = self._save_on_signal(stop[1])  # at once: no evaluation
                    stop = (stop[0], message)
                elif stop is None or stop[0] not in _NO_EPOCH_END:
                    self._end_epoch(epoch, stopped=stop is not None)
                if stop is not None:
                    status, message = stop
                    break
            failed = self._stop_request is not None and self._stop_request[0] == "write_error"
            if failed and status != "interrupted" and self._stop_request is not None:
                status, message = "write_error", self._stop_request[1]  # e.g. the last epoch's checkpoint
        except (RuntimeError, OSError, EOFError) as e:
            # A dead worker shows as PyTorch's RuntimeError (its SIGCHLD handler may raise it even
            # mid-step), or as a broken connection while a batch comes over from the worker.
            cause = stop_workers(loader) or worker_death(e)
            if cause is not None:
                status, message = "worker_died", self._worker_died_message(cause)
            elif isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                written = write_error_message(e.filename or self.out_dir, e)
                status, message = "write_error", f"{written}; {self._last_checkpoint_text()}"
            else:
                raise
        finally:
            stop_workers(loader)
        try:
            self.files.flush()
        except OSError as e:
            self.console.warn(f"log.jsonl not updated: {e}")
        return self._finish(status, message)

    # ------------------------------------------------------------------ faults
    def _stop_asked(self) -> bool:
        """Asked in every step; the answer travels in the step's all-reduce, so all ranks stop
        after the same step. Rank 0's clock decides the time limit; any rank's signal or failed
        write stops every rank."""
        if self._stop_request is None and self.signals is not None and self.signals.received is not None:
            self._stop_request = ("interrupted", "", self.signals.received)
        if self._stop_request is None and self._over_time():
            self._stop_request = ("time_limit", "", None)
        return self._stop_request is not None

    def _agreed_stop(self) -> Stop:
        """Why the run stops, the same on every rank (one gather, at the stop only)."""
        requests = [r for r in D.all_gather_object(self._stop_request) if r is not None]
        for kind in ("write_error", "interrupted", "time_limit"):
            request = next((r for r in requests if r[0] == kind), None)
            if request is not None:
                break
        else:
            request = ("time_limit", "", None)
        kind, text, signum = request
        if kind == "interrupted":
            assert signum is not None
            self._stop_signal = signum
            return kind, f"stopped by {signal.Signals(signum).name} at step {self.step}"
        if kind == "write_error":
            return kind, text or "rank 0 could not write a checkpoint"
        return kind, f"time limit of {self.time_limit:.0f} s reached at step {self.step}"

    def _last_checkpoint_text(self) -> str:
        if not self.info.is_main:
            return "rank 0 holds the checkpoints; resume with --resume"
        if self._saved is None:
            return "no checkpoint was written yet: --resume starts the run from the beginning"
        path, step = self._saved
        return f"last checkpoint: {path} (step {step}); resume with --resume"

    def _save_on_signal(self, message: str) -> str:
        """The checkpoint of a run stopped by a signal: after a whole step, before any evaluation."""
        self.save()
        failed = self._stop_request is not None and self._stop_request[0] == "write_error"
        if self.info.is_main and not failed and self._saved is not None and self._saved[1] == self.step:
            return f"{message}; checkpoint written: {self._saved[0]} (step {self.step}); resume with --resume"
        reason = (
            f" (the checkpoint could not be written: {self._stop_request[1]})" if failed and self._stop_request else ""
        )
        return f"{message}{reason}; {self._last_checkpoint_text()}"

    def _worker_died_message(self, cause: str) -> str:
        hint = ""
        if "SIGKILL" in cause:
            hint = " (SIGKILL is most often the out-of-memory killer: fewer data.workers or a smaller batch use less memory)"
        return f"a data loader worker died ({cause}) at step {self.step}{hint}; {self._last_checkpoint_text()}"

    def _images_gone(self) -> bool:
        folder = Path(self.train_ds.image_dir)
        return not folder.is_dir()

    def _train_epoch(self, loader: torch.utils.data.DataLoader, batch_list: D.BatchList, epoch: int) -> Stop | None:
        """The remaining steps of ``epoch``; returns why the run stops, if it does before the epoch's end."""
        cfg = self.cfg
        batch_list.batches = D.epoch_batches(
            len(self.train_ds), cfg.data.batch_size, cfg.train.seed, epoch, self.info.rank, self.info.world_size
        )[self.iter_in_epoch :]
        self.counts = _EpochCounts()
        self.console.start_epoch(epoch, self.planned_epochs(), self.iter_in_epoch, self.iters_per_epoch)
        self.model.train()
        if self.freezer is not None and self.freezer.apply(epoch, self.console.log) and self.info.distributed:
            self._wrap_ddp()
        try:
            for batch in loader:
                stop = self._step(batch, epoch)
                if stop is not None:
                    return stop
                if (
                    self.checkpoint_interval
                    and self.step % self.checkpoint_interval == 0
                    and self.iter_in_epoch < self.iters_per_epoch
                ):  # an epoch's end saves anyway
                    self.save(weights=False)
        finally:
            self.console.end_epoch()
        return None

    def _step(self, batch, epoch: int) -> Stop | None:
        """One step (``batch`` None: no readable image, nothing trained); returns why the run stops after it."""
        step = self.step
        result = None
        if batch is None and self._images_gone():
            return "data_missing", (
                f"the training image folder {self.train_ds.image_dir} is gone (step {step}: no image of the "
                f"batch could be read); bring it back, then: {self._last_checkpoint_text()}"
            )
        if batch is not None:
            result = train_step(self.parts, batch, self.schedule(step), stop=self._stop_asked)
        self.step += 1
        self.iter_in_epoch += 1
        if result is not None:
            record = step_record(result, step, epoch, self.iter_in_epoch - 1)
            self.files.step(record)
            self.tb.step(record)
            self.step_log.append(record)
            self.counts.add(result)
            if result.applied:
                self.streak = 0
            else:
                self.streak += 1
                self.skipped_total += 1
                limit = self.cfg.train.max_bad_steps
                self.console.warn(bad_step_message(step, result, self.streak, self.skipped_total, limit))
                if self.streak >= limit:
                    return "diverged", (
                        f"training stopped: {self.streak} non-finite losses in a row (last at step "
                        f"{step}); the last good checkpoint is {self.out_dir / 'last.pt'}. "
                        "Lower the learning rate, enable --grad-clip, or check the data."
                    )
        self.console.step(
            result,
            epoch,
            self.step,
            self.iter_in_epoch,
            self.iters_per_epoch,
            self.planned_iters - self.step,
        )
        self.train_seconds += time.time() - self._mark
        self._mark = time.time()
        if self.budget is not None:
            self._replan()
        if self.step >= self.planned_iters and self.planned_iters < self.schedule.full_iters:
            return "completed", f"the schedule fitted to the time budget ends at step {self.step}"
        if self.max_steps is not None and self.step >= self.max_steps:
            return "max_steps", f"stopped after max_steps={self.max_steps}"
        if result is not None and result.stop:
            return self._agreed_stop()
        return None

    def _epochs_text(self) -> str:
        if self.iter_in_epoch == 0:
            return f"{self.epoch} epochs"
        return f"{(self.epoch * self.iters_per_epoch + self.iter_in_epoch) / self.iters_per_epoch:.1f} epochs"

    @property
    def planned_iters(self) -> int:
        """The run's length: the schedule's, which a time budget re-plans (``LRSchedule.fit``)."""
        return self.schedule.total_iters

    def planned_epochs(self) -> int:
        return max(1, math.ceil(self.planned_iters / self.iters_per_epoch))

    def _replan(self) -> None:
        """The run's length from the speed measured so far (every ``REPLAN_EVERY`` steps; rank 0's
        measurement is every rank's plan)."""
        assert self.budget is not None
        self.steps_this_call += 1
        n = self.steps_this_call
        if n < FIRST_PLAN or (n - FIRST_PLAN) % REPLAN_EVERY:
            return
        per_step = self.train_seconds / n
        if self.budget.eval_seconds is None and self.val_ds is not None:
            self.budget.eval_estimate = estimate_eval_seconds(len(self.val_ds), self.cfg.data.batch_size, per_step)
        total = self.budget.plan(self.step, time.time() - self.start_time, per_step)
        total = int(D.broadcast_object(total))
        if total == self.planned_iters:
            return
        first = n == FIRST_PLAN
        shown = self._shown_plan
        self.schedule = self.schedule.fit(total)
        if first or abs(total - shown) > 0.1 * shown:
            self._shown_plan = total
            self.console.log(
                f"time budget: {total} steps ({total / self.iters_per_epoch:.1f} epochs) fit at "
                f"{per_step:.2f} s per step{'' if first else ' (re-planned)'}"
            )

    def _over_time(self) -> bool:
        # Rank 0's clock decides; the step shares the answer with the other ranks.
        return self.time_limit is not None and self.info.is_main and time.time() - self.start_time > self.time_limit

    def _end_epoch(self, epoch: int, stopped: bool) -> None:
        """After the steps of ``epoch`` (all of them, or up to a stop): evaluation, the epoch's
        row in the history, its line, metrics files, curves, checkpoint."""
        train_cfg = self.cfg.train
        complete = self.iter_in_epoch >= self.iters_per_epoch
        if complete:
            self.epoch += 1
            self.iter_in_epoch = 0
        evaluate_now = stopped or (
            complete and ((epoch + 1) % max(1, train_cfg.eval_interval) == 0 or epoch + 1 == train_cfg.epochs)
        )  # a stopped run reports too
        if not (complete or evaluate_now):
            return
        eval_start = time.time()
        metrics = self.evaluate() if evaluate_now else None
        row = _epoch_row(epoch, self.step_log, self.counts, self.step, self.schedule(max(self.step - 1, 0)), complete)
        row["elapsed"] = round(self.elapsed(), 1)  # seconds of the run when this row is known (its evaluation included)
        is_best = False
        if metrics is not None:
            row.update(to_numpy_metrics(metrics))
            row["metrics"] = dict(metrics)
            self.last_metrics = dict(metrics)
            if not self.best or metrics["AP"] > self.best.get("AP", -1.0):
                self.best = {**metrics, "epoch": epoch + 1}
                is_best = True
        if self.history and self.history[-1]["epoch"] == row["epoch"]:
            self.history[-1] = row  # a stopped partial epoch, then finished after a resume
        else:
            self.history.append(row)
        if self.info.is_main:
            self.console.log(epoch_message(row, self.planned_epochs(), metrics, self.elapsed()))
            self.files.metrics_csv(self.history)
            self.tb.evaluation(row)
            if metrics is not None or stopped or self.epoch >= train_cfg.epochs:
                self.files.plots(self.step_log, self.history)  # ~1 s of CPU: not after every epoch
            if metrics is not None:
                self.files.metrics_json(metrics)
        self.save(best=is_best)
        if self.budget is not None and metrics is not None:
            self.budget.eval_seconds = time.time() - eval_start
        self._mark = time.time()  # evaluations and checkpoints are not training steps

    def _finish(self, status: str, message: str) -> TrainResult:
        self.tb.close()
        if status == "diverged":
            self.console.warn(message)
        elif status == "completed":
            self.console.log(
                f"done: {self._epochs_text()}, {self.step} steps in {fmt_time(self.elapsed())}"
                + (f"; best AP {self.best['AP']:.3f} (epoch {self.best['epoch']})" if self.best else "")
            )
        main = self.info.is_main
        result = TrainResult(
            out_dir=self.out_dir,
            status=status,
            message=message,
            epochs=self.epoch,
            steps=self.step,
            wall_time=time.time() - self.start_time,
            last_metrics=self.last_metrics if main else {},
            best_metrics=dict(self.best) if main else {},
            best_epoch=self.best.get("epoch") if self.best else None,
            skipped_steps=self.skipped_total,
            history=[{k: v for k, v in r.items() if k != "metrics"} for r in self.history],
            config=self.cfg,
            model=self.eval_model,
            signal=self._stop_signal if status == "interrupted" else None,
        )
        if status == "completed":
            try:
                self.files.keep_last_only()
            except OSError as e:
                self.console.warn(f"{self.out_dir / 'last.prev.pt'} not removed: {e}")
        self._summary(
            {
                "status": status,
                "message": message,
                "epochs": result.epochs,
                "steps": result.steps,
                "wall_time": result.wall_time,
                "skipped_steps": result.skipped_steps,
                "best_epoch": result.best_epoch,
                "best": result.best_metrics,
                "last": result.last_metrics,
            }
        )
        return result

    def _summary(self, summary: dict[str, Any]) -> None:
        try:
            self.files.summary(summary)
        except OSError as e:  # a full disk must not turn the run's report into a traceback
            self.console.warn(f"summary.json not written: {e}")

    # ------------------------------------------------------------------ hooks: checkpoints, evaluation
    def save(self, best: bool = False, weights: bool = True) -> None:
        """The checkpoint of this step (rank 0). A failed write stops the run after the next step
        (every rank agrees through the step), the files already written left as they are."""
        if not self.info.is_main:
            return
        try:
            written = self.files.checkpoint(self._state(), best=best, weights=weights)
        except CheckpointWriteError as e:
            if e.path.name != "last.pt" and e.path.name != "log.jsonl":
                self._saved = (self.out_dir / "last.pt", self.step)  # last.pt itself was written
            message = (
                f"{e}; {self._last_checkpoint_text().replace('; resume with --resume', '')}, intact. "
                "The run stops: free some space, then resume with --resume"
            )
            if self._stop_request is None or self._stop_request[0] != "write_error":
                self._stop_request = ("write_error", message, None)
            return
        if written:
            self._saved = (self.out_dir / "last.pt", self.step)
        else:
            self.console.warn("the model holds non-finite values: checkpoint not written (the previous one is kept)")

    def evaluate(self) -> dict[str, Any] | None:
        if self.val_ds is None:
            return None
        assert self.val_data is not None  # val_ds is built from it
        val_ann, val_images = self.val_data
        metrics, _ = evaluate_model(
            self.eval_model,
            self.cfg,
            val_ann,
            val_images,
            self.device,
            self.cfg.data.batch_size,
            self.cfg.data.workers,
            dataset=self.val_ds,
            progress=self.console.progress,
            channels_last=self.cfg.train.channels_last,
            amp=self.cfg.train.amp,
        )
        return metrics

    def _state(self) -> dict[str, Any]:
        return {
            "config": config_to_dict(self.cfg),
            **checkpoint_weights(self.model, self.parts.ema),  # "model": the EMA weights when on
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "step": self.step,
            "epoch": self.epoch,
            "iter_in_epoch": self.iter_in_epoch,
            "rng": rng_state(),
            "data": {
                "seed": self.cfg.train.seed,
                "batch_size": self.cfg.data.batch_size,
                "world_size": self.info.world_size,
                "iters_per_epoch": self.iters_per_epoch,
                "num_train_images": len(self.train_ds),
            },
            "history": self.history,
            "best": self.best,
            "counters": {"skipped_steps": self.skipped_total, "wall_time": self.elapsed()},
            "plan": {"total_iters": self.planned_iters},
        }

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are evaluated and saved: the EMA when ``train.ema`` is on."""
        return self.parts.ema.module if self.parts.ema is not None else self.model

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.start_time
