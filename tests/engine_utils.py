"""Shared pieces of the engine tests: a tiny NAS-FPN config and tiny datasets."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from nasfpn.core.config import BackboneConfig, Config, DataConfig, HeadConfig, ModelConfig, NeckConfig, TrainConfig
from nasfpn.data.synthetic import generate_dataset
from nasfpn.engine.data_paths import DataPaths

SIZE = 128


def tiny_config(**train) -> Config:
    """ResNet-10, one 16-channel NAS-FPN stack, one head conv, 128 px, batch 4, deterministic."""
    cfg = Config(
        name="engine_test_tiny",
        model=ModelConfig(
            backbone=BackboneConfig(depth=10, frozen_stages=0, norm_eval=False, pretrained=None),
            neck=NeckConfig(kind="nasfpn", channels=16, stacks=1),
            head=HeadConfig(num_classes=8, stacked_convs=1, feat_channels=16),
        ),
        data=DataConfig(image_size=SIZE, pad_divisor=128, batch_size=4, workers=0),
        train=TrainConfig(
            epochs=2,
            base_lr=0.01,
            base_batch_size=4,
            warmup_iters=2,
            milestones=(1,),
            deterministic=True,
            max_bad_steps=3,
        ),
    )
    return replace(cfg, train=replace(cfg.train, **train))


def synthetic_data(root: Path, num_train: int = 12, num_val: int = 4) -> DataPaths:
    ds = generate_dataset(root, num_train, num_val, image_size=SIZE, seed=0)
    return DataPaths(ds.train_annotations, ds.train_images, ds.val_annotations, ds.val_images)


def same_layout_data(root: Path, num: int = 8, seed: int = 0) -> DataPaths:
    """Images that differ in every pixel but share their boxes: every image has the same number of
    positive anchors (for exact multi-process equivalence, see test_ddp.py)."""
    rng = np.random.default_rng(seed)
    boxes = [(16, 24, 80, 96, 1), (70, 10, 120, 50, 2)]
    images, anns = [], []
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(num):
        img = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        for x1, y1, x2, y2, _ in boxes:
            img[y1:y2, x1:x2] = rng.integers(0, 256, 3, dtype=np.uint8)
        name = f"{i:03d}.png"
        Image.fromarray(img).save(root / "images" / name)
        images.append({"id": i + 1, "file_name": name, "width": SIZE, "height": SIZE})
        for j, (x1, y1, x2, y2, cat) in enumerate(boxes):
            anns.append(
                {
                    "id": 10 * i + j + 1,
                    "image_id": i + 1,
                    "category_id": cat,
                    "iscrowd": 0,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                }
            )
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    ann = root / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return DataPaths(ann, root / "images", ann, root / "images")


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]


def train_args(cfg_file: Path, data: DataPaths, out: Path) -> list[str]:
    """``nasfpn train`` arguments for a config file, a dataset and a run folder."""
    return [
        "train",
        str(cfg_file),
        "--train-ann",
        str(data.train_ann),
        "--train-images",
        str(data.train_images),
        "--val-ann",
        str(data.val_ann),
        "--val-images",
        str(data.val_images),
        "--out",
        str(out),
    ]
