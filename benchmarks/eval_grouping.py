"""Dataset evaluation throughput: batches of one padded shape against the former mixed batches.

    python benchmarks/eval_grouping.py [--model retinanet_r50_nasfpn_crop640_50e] [--images 48]

A COCO-like mix of image sizes (the most frequent val2017 sizes: 640x480 landscape, 480x640
portrait, 640x427, 427x640, 500x375, 375x500, 640x640, 612x612 ...) is written as a synthetic
COCO dataset and evaluated with ``engine.evaluate.predict_dataset`` at batch 8, interleaved:

- ``grouped``: the package as it is (``data.batching``: a batch holds one padded shape);
- ``mixed``: the former batching, consecutive images padded to the largest of each batch.

Prints images/s of both, the padded pixels each pushes through the network, and the machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import nasfpn.data.batching as batching
from harness import interleaved_with_load
from nasfpn.apps.bench import calibrate_scores, environment
from nasfpn.core.presets import PRESETS
from nasfpn.data.synthetic import SyntheticSpec, render_image
from nasfpn.data.transforms import collate_eval
from nasfpn.engine.evaluate import build_eval_dataset, predict_dataset
from nasfpn.models import build_model

# (height, width, weight): a COCO val2017-like size mix (landscape 4:3 about half of the images).
COCO_LIKE = [
    (480, 640, 40),
    (640, 480, 12),
    (427, 640, 14),
    (640, 427, 6),
    (375, 500, 6),
    (500, 375, 3),
    (640, 640, 3),
    (612, 612, 3),
    (480, 640, 0),
    (424, 640, 5),
    (640, 512, 2),
    (333, 500, 3),
    (360, 640, 3),
]


def write_dataset(root: Path, count: int, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    weights = np.array([w for *_, w in COCO_LIKE], dtype=np.float64)
    picks = rng.choice(len(COCO_LIKE), size=count, p=weights / weights.sum())
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i, k in enumerate(picks):
        h, w, _ = COCO_LIKE[k]
        pixels, objects = render_image(SyntheticSpec(image_size=(h, w), max_objects=6), seed, "val", i)
        Image.fromarray(pixels).save(root / "images" / f"{i:04d}.png", compress_level=1)
        images.append({"id": i + 1, "file_name": f"{i:04d}.png", "height": h, "width": w})
        for obj in objects:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": 1 + obj["label"],
                    "bbox": obj["bbox"],
                    "area": obj["area"],
                    "iscrowd": 0,
                }
            )
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(SyntheticSpec().class_names)]
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root / "ann.json", root / "images"


class _ConsecutiveBatches(torch.utils.data.Sampler[list[int]]):
    """The former batching: consecutive indices, whatever their shapes."""

    def __init__(self, sizes, batch_size: int, image_size: int, pad_divisor: int) -> None:
        self.batches = [list(range(i, min(i + batch_size, len(sizes)))) for i in range(0, len(sizes), batch_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _mixed_collate(samples, mean, std, pad_divisor):
    return [collate_eval(samples, mean, std, pad_divisor)]


def run(dataset, model, cfg, batch_size: int, mixed: bool) -> None:
    sampler, collate = batching.ShapeBatchSampler, batching.collate_eval_groups
    if mixed:
        batching.ShapeBatchSampler, batching.collate_eval_groups = _ConsecutiveBatches, _mixed_collate
    try:
        predict_dataset(model, dataset, cfg, "cpu", batch_size, progress=False)
    finally:
        batching.ShapeBatchSampler, batching.collate_eval_groups = sampler, collate


def padded_pixels(dataset, cfg, batch_size: int, mixed: bool) -> int:
    d = cfg.data
    shapes = [batching.padded_input_shape(h, w, d.image_size, d.pad_divisor) for h, w in dataset.json_sizes]
    if mixed:
        groups = _ConsecutiveBatches(shapes, batch_size, 0, 0).batches
    else:
        groups = batching.group_by_shape(shapes, batch_size)
    return sum(len(g) * max(shapes[i][0] for i in g) * max(shapes[i][1] for i in g) for g in groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="retinanet_r50_nasfpn_crop640_50e")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = PRESETS[args.model]
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained_backbone=False).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ann, images = write_dataset(Path(tmp), args.images)
        # Realistic post-processing load: about 1000 candidates per image above score 0.05.
        probe = torch.zeros(1, 3, 512, 640)
        calibrate_scores(model, probe, cfg.model.test.score_thr, 1000)
        cats = tuple(range(1, cfg.model.head.num_classes + 1))
        dataset = build_eval_dataset(ann, images, cfg, cats[: len(SyntheticSpec().class_names)])
        fns = {
            kind: functools.partial(run, dataset, model, cfg, args.batch_size, kind == "mixed")
            for kind in ("grouped", "mixed")
        }
        times, load = interleaved_with_load(fns, args.rounds, warmup=0)
    env = environment()
    print(
        f"{args.model}, {args.images} images of a COCO-like size mix, batch {args.batch_size}, "
        f"{args.threads} threads, {env['cpu']}, torch {env['torch']}, load {load[0]:.2f} -> {load[1]:.2f}"
    )
    for kind in fns:
        seconds = statistics.median(times[kind]["total"])
        mpix = padded_pixels(dataset, cfg, args.batch_size, kind == "mixed") / 1e6
        print(
            f"  {kind:8s} {args.images / seconds:6.2f} images/s  (median of {args.rounds}: {seconds:.1f} s; "
            f"{mpix:.1f} Mpixel padded input)"
        )


if __name__ == "__main__":
    main()
