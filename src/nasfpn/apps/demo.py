"""``nasfpn demo``: the whole pipeline on the embedded synthetic data, on a CPU, in minutes.

1. Generate the synthetic shapes dataset (``data/synthetic.py``) into ``OUT/data``.
2. Plan the schedule for the time budget: a few timed training steps give the speed of this
   machine (and whether bf16 or one thread is faster here); the run is then fitted to the time
   left, its length refined as it measures its speed (``engine.budget``), the lr milestones moved
   with it, in one run.
3. Train ``nasfpn_tiny`` into ``OUT/run`` (``engine.trainer.train``, progress bars, curves).
4. Evaluate (COCO table and per-class AP) and draw the detections of validation images into
   ``OUT/detections``.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from nasfpn.core.config import Config, apply_overrides
from nasfpn.core.presets import PRESETS
from nasfpn.data.coco import CocoDataset, load_coco_json
from nasfpn.data.collate import train_collate
from nasfpn.data.io import read_image
from nasfpn.data.synthetic import generate_dataset
from nasfpn.data.transforms import TrainTransform
from nasfpn.data.vis import draw_detections
from nasfpn.deploy.predictor import load
from nasfpn.engine import step as engine_step
from nasfpn.engine.budget import TimeBudget, estimate_eval_seconds
from nasfpn.engine.coco_metrics import format_table
from nasfpn.engine.data_paths import DataPaths
from nasfpn.engine.distributed import iters_per_epoch
from nasfpn.engine.trainer import train
from nasfpn.models import build_model

# Dataset of the demo: images are generated at the model's input size.
DEMO_TRAIN_IMAGES = 4000
DEMO_VAL_IMAGES = 500
DEMO_MIN_SIZE = 0.1
"""Smallest shape side, as a fraction of the image side: 13 px at 128 px (the generator's default,
0.05, goes down to 8 px, which a 128 px model with a stride-8 finest level resolves poorly)."""
AP50_TARGET = 0.8
EVAL_DURING_MIN_STEPS = 2000
"""Evaluations during training (for the time-to-accuracy curve) only where this many steps fit."""
STEPS_FOR_TARGET = 1200
"""About the steps the demo needs for ``AP50_TARGET`` (benchmarks/RESULTS.md: AP50 0.74-0.75 after
1,000 steps over three seeds, 0.823 after 1,250)."""


@dataclass
class DemoResult:
    out_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    wall_time: float = 0.0
    status: str = ""
    epochs: int = 0

    @property
    def ok(self) -> bool:
        return self.status in ("completed", "time_limit", "max_steps")


def demo_config(overrides: list[str] | None = None) -> Config:
    """``nasfpn_tiny`` as the demo trains it: the 4,000 small images decoded once and held in
    memory (200 MB), anchors matched from IoU 0.4 instead of 0.5 (more positive anchors per small
    object: AP50 0.664 against 0.534 after 1,000 steps), AdamW at 4e-3 with weight decay 0.05
    instead of SGD at 0.08 (0.788 against 0.664 after 1,000 steps; benchmarks/RESULTS.md)."""
    cfg = PRESETS["nasfpn_tiny"]
    m = cfg.model
    model = replace(m, loss=replace(m.loss, pos_iou_thr=0.4, neg_iou_thr=0.4))
    train = replace(cfg.train, optimizer="adamw", base_lr=0.004, weight_decay=0.05)
    return apply_overrides(
        replace(cfg, model=model, data=replace(cfg.data, cache_images=True), train=train), overrides or []
    )


def _timing_dataset(cfg: Config, data):
    """The training set as ``_step_seconds`` reads it (loading and augmentation included)."""
    d = cfg.data
    scale_lo, scale_hi = d.scale_range
    return CocoDataset(
        data.train_ann,
        data.train_images,
        TrainTransform(d.train_crop, (scale_lo, scale_hi), d.flip_prob),
        filter_empty=True,
    )


def _step_seconds(cfg: Config, device: torch.device, dataset, steps: int = 4) -> float:
    """Seconds per training step of ``cfg`` on this machine now: real batches of ``dataset``
    (``_timing_dataset``) through loading, the collate and the trainer's step
    (``engine.step.train_step``: forward, loss, backward, clipping, finiteness check, optimizer step)."""
    d = cfg.data
    collate = train_collate(d)
    torch.manual_seed(0)
    m = cfg.model
    model = build_model(replace(m, head=replace(m.head, num_classes=dataset.num_classes)), pretrained_backbone=False)
    model.to(device).train()
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    lr = 1e-4
    parts = engine_step.build_step_parts(model, cfg.train, lr, m.head.deep_supervision)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        batch = collate([dataset[(j % len(dataset), 0)] for j in range(i * d.batch_size, (i + 1) * d.batch_size)])
        if batch is not None:  # no readable image: the trainer skips such a batch too
            # Through the module, so that whatever wraps engine.step.train_step sees this call too.
            engine_step.train_step(parts, batch, lr)
        times.append(time.perf_counter() - t0)
    rest = sorted(times[1:]) if len(times) > 1 else times
    return rest[len(rest) // 2]


def _fastest_setup(cfg: Config, device: torch.device, dataset, user_amp: bool = False) -> tuple[Config, float]:
    """The fastest CPU set-up for training ``cfg`` here, and its seconds per step.

    Tries all threads and one (on a busy machine one thread can beat several, which wait for each
    other) and, unless the user chose ``train.amp``, bf16 autocast: much faster where the CPU has
    bf16 dot products (AVX512-BF16, AMX), slower where it has not. Leaves the thread count set.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu":
        return cfg, _step_seconds(cfg, device, dataset)
    candidates = [(threads, cfg.train.amp)]
    if not user_amp and cfg.train.amp == "none":
        candidates.append((threads, "bf16"))
    if threads > 1:
        candidates += [(1, amp) for _, amp in candidates]
    timed = []
    for n, amp in candidates:
        torch.set_num_threads(n)
        timed.append((_step_seconds(replace(cfg, train=replace(cfg.train, amp=amp)), device, dataset), n, amp))
    # fp32 unless bf16 is clearly faster: it changes the numerics a little.
    best = min(timed, key=lambda t: t[0] * (1.1 if t[2] == "bf16" and cfg.train.amp == "none" else 1.0))
    step_s, n, amp = best
    torch.set_num_threads(n)
    return replace(cfg, train=replace(cfg.train, amp=amp)), step_s


def plan_schedule(
    cfg: Config,
    num_train: int,
    step_seconds: float,
    budget_seconds: float,
    num_val: int = DEMO_VAL_IMAGES,
    world_size: int = 1,
) -> tuple[Config, int, str]:
    """The first plan for a run of ``cfg`` fitted to ``budget_seconds``: the steps that fit at
    ``step_seconds`` (the trainer refines it as it measures, ``engine.budget``), and ``cfg`` with
    an evaluation interval that gives about three evaluations in the run (only the final one on a
    machine that fits fewer than ``EVAL_DURING_MIN_STEPS``)."""
    steps = iters_per_epoch(num_train, cfg.data.batch_size, world_size)
    t = cfg.train
    budget = TimeBudget(budget_seconds, t.epochs * steps, steps, t.epochs + 1)
    budget.eval_estimate = estimate_eval_seconds(num_val, cfg.data.batch_size, step_seconds)
    first = budget.plan(0, 0.0, step_seconds)
    # An evaluation's cost grows with the machine's slowness, the budget does not: where fewer than
    # EVAL_DURING_MIN_STEPS steps fit, the evaluations before the end (two of 500 images took 15% of
    # the run on a CPU ~4x slower) become training steps, and only the final one is made.
    interval = max(1, math.ceil(first / steps / 3)) if first >= EVAL_DURING_MIN_STEPS else t.epochs + 1
    budget.eval_interval = interval
    total = budget.plan(0, 0.0, step_seconds)
    cfg = replace(cfg, train=replace(t, eval_interval=interval))
    if total >= t.epochs * steps:
        return cfg, total, f"{t.epochs} epochs x {steps} steps fit in the time budget"
    return (
        cfg,
        total,
        (
            f"about {total} steps ({total / steps:.1f} of {t.epochs} epochs) fit in the time budget, "
            f"lr decay moved with them; refined as training measures its speed"
        ),
    )


def _draw_examples(
    weights: Path,
    ann_file: Path,
    image_dir: Path,
    out_dir: Path,
    device: torch.device,
    count: int = 12,
    score_thr: float = 0.3,
) -> list[Path]:
    """Detections on the first ``count`` validation images: one PNG each and a grid ``detections.png``."""
    det = load(None, weights=weights, device=device)
    images_info = load_coco_json(ann_file)["images"][:count]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, tiles = [], []
    arrays = [read_image(image_dir / info["file_name"]) for info in images_info]
    results = det.predict(arrays, score_thr=score_thr, batch_size=8)
    for info, image, res in zip(images_info, arrays, results):
        # Small images are enlarged so that the labels stay readable.
        zoom = max(1, 384 // max(image.shape[:2]))
        if zoom > 1:
            image = np.asarray(
                Image.fromarray(image).resize((image.shape[1] * zoom, image.shape[0] * zoom), Image.Resampling.BILINEAR)
            )
        drawn = draw_detections(image, res["boxes"] * zoom, res["labels"], res["scores"], det.class_names)
        path = out_dir / f"{Path(info['file_name']).stem}.png"
        drawn.save(path)
        paths.append(path)
        tiles.append(drawn)
    if tiles:
        cols = min(4, len(tiles))
        rows = math.ceil(len(tiles) / cols)
        w, h = tiles[0].size
        grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
        for i, tile in enumerate(tiles):
            grid.paste(tile.resize((w, h)), ((i % cols) * w, (i // cols) * h))
        grid.save(out_dir.parent / "detections.png")
    return paths


def run_demo(
    out_dir: str | Path = "nasfpn_demo",
    minutes: float = 10.0,
    device: str = "cpu",
    seed: int = 0,
    overrides: list[str] | None = None,
    progress: bool | None = None,
    num_train: int | None = None,
    num_val: int | None = None,
    print_fn=print,
    started: float | None = None,
) -> DemoResult:
    """Generate data, train ``nasfpn_tiny``, evaluate and draw, within ``minutes`` of wall time
    counted from ``started`` (a ``time.time()``; default: now; the command line's: its process start)."""
    start = time.time() if started is None else min(started, time.time())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    cfg = demo_config(overrides)
    cfg = replace(cfg, train=replace(cfg.train, seed=seed))
    num_train = DEMO_TRAIN_IMAGES if num_train is None else num_train
    num_val = DEMO_VAL_IMAGES if num_val is None else num_val
    if progress is None:
        progress = sys.stderr.isatty()

    print_fn(
        f"[1/4] synthetic dataset: {num_train} train + {num_val} val images of "
        f"{cfg.data.image_size}x{cfg.data.image_size} -> {out / 'data'}"
    )
    workers = max(1, min(4, torch.get_num_threads()))
    ds = generate_dataset(
        out / "data",
        num_train,
        num_val,
        image_size=cfg.data.image_size,
        seed=seed,
        workers=workers,
        min_size=DEMO_MIN_SIZE,
    )
    print_fn(f"      ready in {time.time() - start:.0f} s ({len(ds.class_names)} classes: {', '.join(ds.class_names)})")

    data = DataPaths(ds.train_annotations, ds.train_images, ds.val_annotations, ds.val_images)
    threads = torch.get_num_threads()
    cfg, step_s = _fastest_setup(
        cfg, dev, _timing_dataset(cfg, data), user_amp=any(o.startswith("train.amp=") for o in overrides or [])
    )
    # After training: the pictures (model loading, 12 predictions, PNGs), ~2 s here and ~4 s on a CPU
    # 4x slower; the training itself ends within its limit, final evaluation included.
    reserve = 3.0 + 10.0 * step_s

    def time_left() -> float:
        return minutes * 60.0 - (time.time() - start) - reserve

    cfg, planned, plan = plan_schedule(cfg, num_train, step_s, time_left(), num_val)
    precision = "fp32" if cfg.train.amp == "none" else f"{cfg.train.amp} autocast"
    print_fn(f"[2/4] schedule: {plan}; {torch.get_num_threads()} thread(s), {precision}, {step_s:.2f} s per step")
    if planned < STEPS_FOR_TARGET and num_train == DEMO_TRAIN_IMAGES:
        needed = math.ceil((minutes * 60.0 * STEPS_FOR_TARGET / planned) / 60.0)
        print_fn(
            f"      note: AP50 {AP50_TARGET} took about {STEPS_FOR_TARGET} steps in the measured runs and this "
            f"machine fits about {planned}; `--minutes {needed}` would give them"
        )

    run_dir = out / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the demo's own folder: a new demo is a new run
    print_fn(f"[3/4] training {cfg.name} on {dev} -> {run_dir}")
    try:
        result = train(
            cfg, data, run_dir, device=device, progress=progress, time_limit=max(time_left(), 1.0), fit_to_time=True
        )
    finally:
        torch.set_num_threads(threads)
    metrics = result.best_metrics or result.last_metrics
    demo = DemoResult(out, dict(metrics), 0.0, result.status, result.epochs)
    if not result.ok:
        print_fn(f"error: {result.message}")
        demo.wall_time = time.time() - start
        return demo

    weights = run_dir / ("best.safetensors" if (run_dir / "best.safetensors").is_file() else "last.safetensors")
    print_fn(f"[4/4] evaluation on the validation images (best checkpoint, {precision}):")
    if metrics:
        print_fn(format_table(metrics))
    try:
        pictures = _draw_examples(weights, ds.val_annotations, ds.val_images, out / "detections", dev)
        print_fn(f"      {len(pictures)} pictures of detections in {out / 'detections'}, grid {out / 'detections.png'}")
    except Exception as e:  # pictures are a bonus: never fail the demo for them
        print(f"warning: could not draw detections: {e}", file=sys.stderr)
    demo.wall_time = time.time() - start
    if metrics:
        reached = "reached" if metrics["AP50"] >= AP50_TARGET else "not reached"
        print_fn(
            f"AP {metrics['AP']:.3f}, AP50 {metrics['AP50']:.3f} (target {AP50_TARGET} {reached}) "
            f"in {demo.wall_time / 60:.1f} min; curves {run_dir / 'loss.png'}, {run_dir / 'ap.png'}"
        )
    return demo
