"""The proxy task that rewards a genotype, a held-out split, and a cheap stand-in for tests.

The paper rewards an architecture with the AP of a small RetinaNet trained briefly from scratch
(ResNet-10, 512 px images, 10 epochs) on a held-out part of COCO train2017 (7392 images). A
proxy trial here is an ordinary training run of ``engine.trainer.train`` with a short schedule,
in its own folder; the reward is the box AP on the held-out split. Defaults are sized for a
2-core CPU: about a minute per trial on the embedded synthetic dataset.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from nasfpn.core.config import (
    AnchorConfig,
    BackboneConfig,
    Config,
    DataConfig,
    HeadConfig,
    LossConfig,
    ModelConfig,
    NeckConfig,
    TrainConfig,
)
from nasfpn.core.fileio import write_json_atomic, write_text_atomic
from nasfpn.core.presets import get_config
from nasfpn.data.coco import load_coco_json
from nasfpn.data.synthetic import SyntheticSpec, generate_dataset
from nasfpn.engine.trainer import DataPaths, train
from nasfpn.models import build_model
from nasfpn.models.nasfpn import LEVELS, NASFPN_GENOTYPE, Genotype
from nasfpn.models.summary import count_flops, count_params

PAPER_HELD_OUT = 7392
"""Images the paper held out of COCO train2017 to reward architectures."""


# --------------------------------------------------------------------------- held-out split
def split_held_out(
    ann_file: str | Path, out_dir: str | Path, held_out: int | float = PAPER_HELD_OUT, seed: int = 0
) -> tuple[Path, Path]:
    """Carve a held-out part out of a COCO train json, deterministically.

    ``held_out``: a number of images, or a fraction in (0, 1). Images are drawn by a seeded
    permutation of the sorted image ids, so the same file, size and seed always give the same
    split. Writes ``{stem}_search_train.json`` and ``{stem}_search_heldout.json`` (same image
    folder as the input) under ``out_dir`` and returns their paths.
    """
    ann_file = Path(ann_file)
    data = load_coco_json(ann_file)
    ids = sorted(int(img["id"]) for img in data["images"])
    n = len(ids)
    k = round(held_out * n) if isinstance(held_out, float) and 0 < held_out < 1 else int(held_out)
    if not 0 < k < n:
        raise ValueError(
            f"{ann_file}: cannot hold out {held_out} of {n} images; need 0 < held-out < {n} "
            "(a count, or a fraction in (0, 1))"
        )
    order = np.random.default_rng(seed).permutation(n)
    held = {ids[i] for i in order[:k]}
    parts = {}
    for name, keep in (("train", lambda i: i not in held), ("heldout", lambda i: i in held)):
        parts[name] = {
            **{key: v for key, v in data.items() if key not in ("images", "annotations")},
            "images": [img for img in data["images"] if keep(int(img["id"]))],
            "annotations": [a for a in data["annotations"] if keep(int(a["image_id"]))],
        }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("train", "heldout"):
        path = out_dir / f"{ann_file.stem}_search_{name}.json"
        text = json.dumps(parts[name])
        if not (path.is_file() and path.read_text() == text):
            write_text_atomic(text, path)
        paths.append(path)
    return paths[0], paths[1]


# --------------------------------------------------------------------------- the proxy task
@functools.lru_cache(maxsize=8)
def _images_with_boxes(ann_file: str) -> int:
    """Images of a COCO json with a non-crowd box (read once per process: a config is asked for
    several times per trial)."""
    data = load_coco_json(ann_file)
    return len({int(a["image_id"]) for a in data["annotations"] if not a.get("iscrowd", 0)})


OTHER_WEIGHTS = ("last.prev.pt", "best.pt", "last.safetensors", "best.safetensors")
"""A finished run's files besides ``last.pt`` that hold weights (deleted unless ``keep_weights``)."""


@dataclass(frozen=True)
class ProxySettings:
    """The proxy model and schedule (the paper: ResNet-10, 512 px, 10 epochs)."""

    depth: int = 10
    """Backbone ResNet depth, trained from scratch."""
    image_size: int = 128
    epochs: int = 4
    stacks: int = 1
    """Stacked pyramid networks of the searched genotype."""
    width: int = 32
    """Pyramid and head channels."""
    head_convs: int = 2
    anchor_scale: float = 2.0
    """Anchor size in strides (the full model: 4). Small images hold small objects: at 128 px the
    synthetic shapes are 6-64 px, which anchors of 32 px and up at P3 would mostly miss."""
    batch_size: int = 8
    lr: float = 0.04
    warmup_iters: int = 50
    optimizer: str = "sgd"
    """``"sgd"`` (with ``lr`` ~0.04) or ``"adamw"`` (``lr`` ~4e-3): ``TrainConfig.optimizer``."""
    weight_decay: float = 1e-4
    """``TrainConfig.weight_decay`` (AdamW's decoupled decay: ~0.05)."""
    match_iou: float = 0.5
    """Anchors are positive from this IoU with a box and negative below it (RetinaNet: 0.5). At
    0.4 small objects get more positive anchors, which speeds up short trainings."""
    seed: int = 0
    """Training seed, the same for every trial so that rewards compare architectures only."""
    seeds: int = 1
    """Training runs per trial, with seeds ``seed``, ``seed + 1``, ...; the reward is their mean AP.
    At the default budget a single run's AP varies with the seed about as much as it does between
    good architectures (docs/search.md): more seeds buy a steadier ranking with trial time."""
    separable: bool = False
    """Train the Lite form: depthwise-separable merging-cell and head convs (docs/nasfpn_lite.md)."""
    precision: str = "fp32"
    """``"bf16"`` / ``"fp16"``: autocast and channels-last training (bf16 on CPUs with AVX512-BF16
    or AMX, either on CUDA). 1.6x faster trials on such a CPU; rewards of different precisions
    are not comparable, like those of any two proxy settings."""

    ema: float = 0.0
    """EMA decay of the weights (e.g. 0.98 for a 160-step proxy; 0: off). The reward is then the AP
    of the averaged weights (``engine.ema``), which, like a decayed learning rate, smooths out the
    noise of the last steps: a rung stopped before the schedule's step decay scores a steadier
    model. The EMA state is in ``last.pt``, so a promoted trial continues the same average."""
    ema_tau: float = 20.0
    """EMA warm-up in steps (``train.ema_tau``): the decay of update n is
    ``ema * (1 - exp(-n / ema_tau))``. The trainer's default (2000) is longer than a whole proxy
    run, which would leave the average close to the raw weights."""

    max_steps: int = 0
    """Multi-fidelity searches (``asha``): every run follows the schedule of ``max_steps`` steps
    (``epochs`` is then ``ceil(max_steps / steps per epoch)``, the step decay in its last epoch)
    and a rung stops it after its own budget, so a rung's run is the start of the top rung's
    and a promoted trial continues from its checkpoint. 0: ``epochs`` as set."""

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"proxy precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.seeds < 1:
            raise ValueError(f"proxy seeds must be >= 1, got {self.seeds}")
        if not (self.ema == 0.0 or 0.0 < self.ema < 1.0):
            raise ValueError(f"proxy ema must be 0 (off) or a decay in (0, 1), got {self.ema}")
        if self.ema_tau < 0:
            raise ValueError(f"proxy ema_tau must be >= 0 steps, got {self.ema_tau}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"proxy optimizer must be sgd or adamw, got {self.optimizer!r}")
        if not 0.0 < self.match_iou < 1.0:
            raise ValueError(f"proxy match_iou must be in (0, 1), got {self.match_iou}")


def proxy_config(
    genotype: Genotype,
    settings: ProxySettings,
    num_classes: int,
    class_names: tuple[str, ...] = (),
    category_ids: tuple[int, ...] = (),
) -> Config:
    """The training config of one proxy trial."""
    s = settings
    return Config(
        name=f"proxy_r{s.depth}_nasfpn_{s.stacks}x{s.width}_{s.image_size}",
        model=ModelConfig(
            backbone=BackboneConfig(depth=s.depth, frozen_stages=0, norm_eval=False, pretrained=None),
            neck=NeckConfig(
                kind="nasfpn",
                channels=s.width,
                stacks=s.stacks,
                genotype=genotype.to_string(),
                separable=s.separable,
            ),
            head=HeadConfig(
                num_classes=num_classes, stacked_convs=s.head_convs, feat_channels=s.width, separable=s.separable
            ),
            anchors=AnchorConfig(octave_base_scale=s.anchor_scale),
            loss=LossConfig(pos_iou_thr=s.match_iou, neg_iou_thr=s.match_iou),
        ),
        data=DataConfig(
            image_size=s.image_size,
            pad_divisor=128,
            batch_size=s.batch_size,
            workers=0,
            class_names=tuple(class_names),
            category_ids=tuple(category_ids),
        ),
        train=TrainConfig(
            epochs=s.epochs,
            optimizer=s.optimizer,
            base_lr=s.lr,
            weight_decay=s.weight_decay,
            base_batch_size=s.batch_size,
            warmup_iters=s.warmup_iters,
            milestones=(max(1, s.epochs - 1),),
            eval_interval=s.epochs,
            seed=s.seed,
            amp="none" if s.precision == "fp32" else s.precision,
            channels_last=s.precision != "fp32",
            ema=s.ema,
            ema_tau=s.ema_tau,
        ),
    )


@dataclass(frozen=True)
class ProxyTask:
    """Reward = box AP on ``heldout_ann`` after a short training run on ``train_ann``.

    ``images``: the image folder of both annotation files (a held-out split of a train set), or
    ``heldout_images`` when the held-out annotations live elsewhere.
    """

    train_ann: str
    images: str
    heldout_ann: str
    heldout_images: str | None = None
    settings: ProxySettings = field(default_factory=ProxySettings)
    class_names: tuple[str, ...] = ()
    category_ids: tuple[int, ...] = ()
    keep_weights: bool = False
    """Keep each finished trial's checkpoints. By default they are deleted once its reward is
    known (only the search log matters then), because they add up: about 110 MB a trial with
    the default proxy, several GB per search."""

    @classmethod
    def from_files(
        cls,
        train_ann: str | Path,
        images: str | Path,
        heldout_ann: str | Path,
        heldout_images: str | Path | None = None,
        settings: ProxySettings | None = None,
        keep_weights: bool = False,
    ) -> ProxyTask:
        """A task whose classes are those of the train annotation file (sorted by category id)."""
        cats = sorted((int(c["id"]), str(c.get("name", c["id"]))) for c in load_coco_json(train_ann)["categories"])
        return cls(
            str(train_ann),
            str(images),
            str(heldout_ann),
            str(heldout_images) if heldout_images else None,
            settings or ProxySettings(),
            tuple(n for _, n in cats),
            tuple(i for i, _ in cats),
            keep_weights,
        )

    def config(self, genotype: Genotype, seed_index: int = 0) -> Config:
        settings = replace(self.settings, seed=self.settings.seed + seed_index)
        if settings.max_steps:
            settings = replace(settings, epochs=self.epochs_for(settings.max_steps))
        return proxy_config(genotype, settings, len(self.class_names), self.class_names, self.category_ids)

    def epochs_for(self, steps: int) -> int:
        """Epochs that hold ``steps`` training steps: the images with a box (those the trainer
        keeps, crowd and ignored boxes aside), ``batch_size`` a step."""
        per_epoch = max(1, -(-_images_with_boxes(self.train_ann) // self.settings.batch_size))
        return max(1, -(-steps // per_epoch))

    def for_split(self, heldout_ann: str | Path, heldout_images: str | Path | None = None) -> ProxyTask:
        """The same task rewarded on another annotated set (the user's validation set, once the
        search is over)."""
        images = str(heldout_images) if heldout_images else None
        return replace(self, heldout_ann=str(heldout_ann), heldout_images=images)

    def __call__(
        self, genotype: Genotype, trial_dir: Path, device: str = "cpu", steps: int | None = None
    ) -> dict[str, Any]:
        """Train and reward one genotype; ``steps`` (with ``settings.max_steps``): stop at that
        many steps of the ``max_steps`` schedule, continuing from the folder's checkpoint."""
        if steps is not None and not self.settings.max_steps:
            raise ValueError("a proxy run with a step budget needs settings.max_steps (a multi-fidelity search)")
        cfg = self.config(genotype)
        model = build_model(cfg.model, pretrained_backbone=False)
        cost: dict[str, float] = {"params": count_params(model), "flops": count_flops(model, cfg.data.image_size)}
        del model
        trial_dir = Path(trial_dir)
        n = self.settings.seeds
        # One run: in the trial folder itself. Several: one folder per seed, each run's metrics
        # kept in it, so that a search stopped mid-trial trains only the runs it had not finished.
        runs = [
            self._run(self.config(genotype, k), trial_dir if n == 1 else trial_dir / f"seed{k}", device, steps)
            for k in range(n)
        ]
        metrics: dict[str, Any] = {
            k: sum(r[k] for r in runs) / n for k in ("AP", "AP50", "AP75") if all(k in r for r in runs)
        }
        if n > 1:
            metrics["AP_per_seed"] = [r["AP"] for r in runs]
        cost["train_s"] = round(sum(r["train_s"] for r in runs), 2)
        if steps is not None:
            cost["steps"] = steps
            cost["resumed"] = all(r.get("resumed", False) for r in runs)
        return {"reward": float(metrics["AP"]), "metrics": metrics, "cost": cost}

    def _run(self, cfg: Config, run_dir: Path, device: str, steps: int | None = None) -> dict[str, float]:
        """One proxy training: held-out AP, AP50, AP75 and its training seconds (to ``steps``)."""
        done = run_dir / ("proxy_result.json" if steps is None else f"proxy_result_{steps}.json")
        if done.is_file():
            return json.loads(done.read_text())
        data = DataPaths(
            train_ann=self.train_ann,
            train_images=self.images,
            val_ann=self.heldout_ann,
            val_images=self.heldout_images or self.images,
        )
        # A run that was going when the search stopped continues from its last checkpoint.
        resume = (run_dir / "last.pt").is_file()
        result = train(
            cfg,
            data,
            out_dir=run_dir,
            resume=resume,
            device=device,
            quiet=True,
            check_images=False,
            max_steps=steps,
        )
        if result.status == "diverged":
            raise FloatingPointError(f"proxy training diverged: {result.message}")
        metrics = dict(result.last_metrics)
        if "AP" not in metrics:
            raise RuntimeError(f"proxy training gave no held-out metrics ({result.status}: {result.message})")
        out: dict[str, float] = {k: float(metrics[k]) for k in ("AP", "AP50", "AP75") if k in metrics}
        out["train_s"] = round(result.wall_time, 2)
        if steps is not None:
            out["steps_done"] = int(result.steps)
            out["resumed"] = resume  # continued from the previous rung's (or an interrupted run's) checkpoint
        write_json_atomic(out, done, indent=None)
        if not self.keep_weights:
            # A rung below the top keeps last.pt: a promotion trains on from it.
            last = steps is None or steps >= self.settings.max_steps
            for name in (("last.pt",) if last else ()) + OTHER_WEIGHTS:
                (run_dir / name).unlink(missing_ok=True)
        return out


def full_size_config(genotype: Genotype, preset: str = "retinanet_r50_nasfpn_crop640_50e") -> Config:
    """``preset`` with its NAS-FPN built on ``genotype``: the model to train once the search is
    done (``nasfpn train best_config.yaml``)."""
    cfg = get_config(preset)
    name = cfg.name.replace("nasfpn", "nasfpn_searched", 1) if "nasfpn" in cfg.name else f"{cfg.name}_searched"
    return replace(
        cfg,
        name=name,
        model=replace(cfg.model, neck=replace(cfg.model.neck, kind="nasfpn", genotype=genotype.to_string())),
    )


# --------------------------------------------------------------------------- a cheap stand-in
def _signature(genotype: Genotype) -> list[tuple]:
    return sorted((c.op, *sorted(genotype.node_level(x) for x in c.inputs), c.level) for c in genotype.cells)


def genotype_similarity(a: Genotype, b: Genotype) -> float:
    """Shared cells (by op, input levels and output level) over the larger cell count: 1 for the
    same pyramid, near 0 for unrelated ones."""
    sa, sb = _signature(a), _signature(b)
    shared, rest = 0, list(sb)
    for s in sa:
        if s in rest:
            rest.remove(s)
            shared += 1
    return shared / max(len(sa), len(sb))


def _unit_hash(text: str, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class FakeEvaluator:
    """A deterministic, instant stand-in for ``ProxyTask`` (tests, dry runs).

    Reward: ``genotype_similarity`` to ``target`` plus up to ``noise`` of hash noise. A genotype
    fails (raises) with probability ``fail_rate`` and kills its worker process (``os._exit``)
    with probability ``crash_rate`` (only in a worker process), both decided by its hash.
    ``seconds``: sleep per trial. With ``steps`` (a multi-fidelity rung) the reward is scaled by
    ``steps / (steps + 20)``, a learning curve that keeps the order of architectures.
    ``for_split`` gives the evaluator of another split (its noise differs: ``split``).
    """

    target: str = NASFPN_GENOTYPE.to_string()
    noise: float = 0.05
    seconds: float = 0.0
    fail_rate: float = 0.0
    crash_rate: float = 0.0
    split: str = "heldout"
    creator_pid: int = field(default_factory=os.getpid)

    def for_split(self, heldout_ann: str | Path, heldout_images: str | Path | None = None) -> FakeEvaluator:
        return replace(self, split=f"other:{heldout_ann}")

    def __call__(
        self, genotype: Genotype, trial_dir: Path, device: str = "cpu", steps: int | None = None
    ) -> dict[str, Any]:
        text = genotype.to_string()
        if self.seconds:
            time.sleep(self.seconds)
        u = _unit_hash(text, "fail")
        if u < self.fail_rate:
            raise RuntimeError("simulated training failure")
        if u < self.fail_rate + self.crash_rate and os.getpid() != self.creator_pid:
            os._exit(3)
        salt = "noise" if self.split == "heldout" else f"noise:{self.split}"
        reward = genotype_similarity(genotype, Genotype.from_string(self.target)) + self.noise * _unit_hash(text, salt)
        n_levels = len({c.level for c in genotype.cells} & set(LEVELS))
        cost: dict[str, Any] = {"cells": len(genotype.cells), "levels": n_levels}
        if steps is not None:
            reward *= steps / (steps + 20)
            cost["steps"] = steps
        return {"reward": reward, "metrics": {"AP": reward}, "cost": cost}


# --------------------------------------------------------------------------- data for a search
def _find_layout(root: Path) -> tuple[Path, Path]:
    """``(train annotations, train images)`` of a dataset folder: our synthetic layout
    (``annotations/instances_train.json`` + ``train/``) or COCO 2017's."""
    for ann, images in (
        (root / "annotations" / "instances_train.json", root / "train"),
        (root / "annotations" / "instances_train2017.json", root / "train2017"),
    ):
        if ann.is_file() and images.is_dir():
            return ann, images
    raise ValueError(
        f"{root}: no annotations/instances_train.json + train/ (or COCO's instances_train2017.json + "
        "train2017/); give --train-ann and --train-images instead"
    )


def prepare_proxy_task(
    work_dir: str | Path,
    settings: ProxySettings | None = None,
    data: str | Path | None = None,
    train_ann: str | Path | None = None,
    train_images: str | Path | None = None,
    heldout_ann: str | Path | None = None,
    heldout_images: str | Path | None = None,
    held_out: int | float | str = "auto",
    split_seed: int = 0,
    synthetic_images: int = 400,
    synthetic_size: int | None = None,
    keep_weights: bool = False,
    synthetic_min_size: float | None = None,
) -> ProxyTask:
    """The proxy task of a search: its data located, generated or split under ``work_dir``.

    ``data``: a dataset folder, or ``"synthetic"`` for the embedded dataset (``synthetic_images``
    training images of ``synthetic_size`` px, default the proxy image size, shapes from
    ``synthetic_min_size`` of the image side, written to ``work_dir/data``); or name ``train_ann`` + ``train_images``. Unless ``heldout_ann`` is given,
    ``held_out`` images (a count, a fraction, or ``"auto"``: the paper's 7392 for COCO-sized sets,
    else 20%) are carved out of the training annotations with ``split_held_out``.
    """
    settings = settings or ProxySettings()
    work_dir = Path(work_dir)
    if data is not None and str(data) == "synthetic":
        ds = generate_dataset(
            work_dir / "data",
            num_train=synthetic_images,
            num_val=0,
            image_size=synthetic_size or settings.image_size,
            seed=0,
            min_size=SyntheticSpec.min_size if synthetic_min_size is None else synthetic_min_size,
        )
        train_ann, train_images = ds.train_annotations, ds.train_images
    elif data is not None:
        train_ann, train_images = _find_layout(Path(data))
    if train_ann is None or train_images is None:
        raise ValueError("name the data: data='synthetic', a dataset folder, or train_ann + train_images")
    if heldout_ann is None:
        if held_out == "auto":
            n = len(load_coco_json(train_ann)["images"])
            held_out = PAPER_HELD_OUT if n >= 4 * PAPER_HELD_OUT else 0.2
        elif isinstance(held_out, str):
            held_out = float(held_out) if "." in held_out else int(held_out)
        train_ann, heldout_ann = split_held_out(train_ann, work_dir / "split", held_out, split_seed)
    return ProxyTask.from_files(
        Path(train_ann).resolve(),
        Path(train_images).resolve(),
        Path(heldout_ann).resolve(),
        Path(heldout_images).resolve() if heldout_images else None,
        settings,
        keep_weights,
    )
