"""COCO evaluation of a model on an annotated image folder, in one or several processes.

Images go through the test pre-processing (keep-ratio resize to ``image_size``, normalise, pad
to ``pad_divisor``) exactly as ``Detector.predict`` does, and batch only with images of the same
padded shape (``data.batching``), so the results do not depend on the batch size, the order of
the dataset or the number of processes. Under ``torchrun`` each rank predicts
every ``world_size``-th image; predictions are gathered with ``all_gather_object`` and rank 0
scores them. Unreadable images are logged and skipped (their ground truth counts as missed).

The ground-truth JSON is checked first (``check_ground_truth``: the checks of ``nasfpn check-data``,
images not read), so that a malformed annotation is reported by file, index and id before any
inference, rather than failing inside the COCO scorer after it.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from nasfpn.core.classes import label_category_ids
from nasfpn.core.config import Config, TestConfig
from nasfpn.core.precision import autocast_dtype
from nasfpn.core.structures import ImageMeta
from nasfpn.data.batching import ShapeBatchSampler, collate_eval_groups
from nasfpn.data.checks import ERROR, check_dataset, format_report
from nasfpn.data.coco import CocoDataset
from nasfpn.data.transforms import EvalTransform
from nasfpn.engine import distributed as D
from nasfpn.engine.coco_metrics import STAT_KEYS, evaluate_detections, results_from_predictions
from nasfpn.engine.hooks import ProgressLines
from nasfpn.models.detector import Outputs


@runtime_checkable
class _Postprocessing(Protocol):
    """What evaluation calls besides the forward pass (``RetinaNet`` and its inference copies have it)."""

    def postprocess(
        self, outputs: Outputs, metas: list[ImageMeta], test_cfg: TestConfig | None = None
    ) -> list[dict[str, torch.Tensor]]: ...


def _progress_enabled(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


@torch.no_grad()
def predict_dataset(
    model: nn.Module,
    dataset,
    cfg: Config,
    device: torch.device | str,
    batch_size: int = 8,
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    progress: bool | None = None,
    channels_last: bool = False,
    amp: str = "none",
) -> list[dict[str, Any]]:
    """Detections of this rank's share of ``dataset`` (a ``CocoDataset`` with ``EvalTransform``).

    Returns one dict per image: ``image_id``, ``boxes`` (D, 4) xyxy original pixels, ``scores``,
    ``labels`` (numpy).
    """
    if not isinstance(model, _Postprocessing):
        raise TypeError(f"{type(model).__name__} has no postprocess(outputs, metas): evaluation needs a detector")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    indices = D.shard_indices(len(dataset), rank, world_size)
    subset = torch.utils.data.Subset(dataset, indices)
    # Batches of one padded shape (sizes from the annotation file; the collate re-groups by the
    # sizes actually read), so an image's detections do not depend on its batch neighbours.
    sizes = [tuple(dataset.json_sizes[i]) for i in indices]
    sampler = ShapeBatchSampler(sizes, batch_size, cfg.data.image_size, cfg.data.pad_divisor)
    collate = functools.partial(
        collate_eval_groups, mean=cfg.data.mean, std=cfg.data.std, pad_divisor=cfg.data.pad_divisor
    )
    loader = torch.utils.data.DataLoader(subset, batch_sampler=sampler, num_workers=workers, collate_fn=collate)
    out: list[dict[str, Any]] = []
    show = _progress_enabled(progress) and rank == 0
    # Without a terminal (piped, logged) the bar is hidden: plain lines instead, unless progress=False.
    lines = ProgressLines("eval", len(indices)) if progress is None and not show and rank == 0 else None
    amp_dtype = autocast_dtype(amp)
    for groups in tqdm(loader, desc="eval", unit="batch", disable=not show, leave=False, dynamic_ncols=True):
        for images, metas, infos in groups:
            if not infos:
                continue
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                outputs = model(images)
            outputs = ([m.float() for m in outputs[0]], [m.float() for m in outputs[1]])
            dets = model.postprocess(outputs, metas)
            for info, det in zip(infos, dets):
                out.append(
                    {
                        "image_id": info["image_id"],
                        "boxes": det["boxes"].cpu().numpy(),
                        "scores": det["scores"].cpu().numpy(),
                        "labels": det["labels"].cpu().numpy(),
                    }
                )
            if lines is not None:
                lines.update(len(infos))
    model.train(was_training)
    return out


def check_ground_truth(
    ann_file: str | Path | Mapping[str, Any], image_dir: str | Path | None = None, max_examples: int = 10
) -> None:
    """Refuse a ground-truth file with error-level problems (a missing or malformed ``bbox``, an
    unknown category or image id, duplicate ids, ...): ``ValueError`` naming the file and each bad
    annotation (index or id, image), what is wrong and what to do. Warnings (empty boxes, boxes
    crossing the border) are scored as they are. The images are not read here."""
    problems = check_dataset(ann_file, image_dir, check_images=False)  # the images are not read
    errors = [p for p in problems if p.severity == ERROR]
    if errors:
        # format_report's first line counts errors and warnings; only the errors are listed here.
        report = "\n".join(format_report(errors, max_examples).splitlines()[1:])
        raise ValueError(
            f"{ann_file}: {len(errors)} error(s) in the ground truth, nothing evaluated:\n{report}\n"
            f"fix these entries of {ann_file} (`nasfpn check-data {ann_file} {image_dir or 'IMAGE_DIR'}` "
            "reports every problem of the file and its images), then evaluate again"
        )


def build_eval_dataset(
    ann_file: str | Path | Mapping[str, Any],
    image_dir: str | Path,
    cfg: Config,
    category_ids: tuple[int, ...] | None = None,
) -> CocoDataset:
    return CocoDataset(
        ann_file,
        image_dir,
        EvalTransform(cfg.data.image_size),
        category_ids=list(category_ids) if category_ids else None,
        on_read_error="skip",
    )


def evaluate_model(
    model: nn.Module,
    cfg: Config,
    ann_file: str | Path | Mapping[str, Any],
    image_dir: str | Path,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    workers: int = 0,
    dataset=None,
    progress: bool | None = None,
    channels_last: bool = False,
    amp: str = "none",
    check: bool = True,
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """COCO box metrics of ``model`` on a dataset: ``(metrics, results)`` on rank 0, ``(None, [])``
    on other ranks. ``check``: ``check_ground_truth`` before the dataset is read (when ``dataset``
    is not given; a caller that checked already passes False).

    ``metrics`` has the 12 COCO statistics (``AP``, ``AP50``, ...), ``per_class`` AP and
    ``eval_seconds``; ``results`` is the COCO results list (dataset category ids).
    """
    start = time.time()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    # The rule predictions follow too: the config's ids, else COCO's for 80 classes, else 1..k.
    cat_ids = label_category_ids(cfg.model.head.num_classes, cfg.data.category_ids)
    if dataset is None:
        if check:
            check_ground_truth(ann_file)
        dataset = build_eval_dataset(ann_file, image_dir, cfg, cat_ids)
    preds = predict_dataset(model, dataset, cfg, device, batch_size, workers, rank, world, progress, channels_last, amp)
    gathered = D.all_gather_object(preds)
    if rank != 0:
        return None, []
    merged = sorted((p for part in gathered for p in part), key=lambda p: p["image_id"])
    results = results_from_predictions(merged, cat_ids)
    metrics = evaluate_detections(ann_file, results)
    metrics["eval_seconds"] = time.time() - start
    metrics["num_images"] = len(merged)
    return metrics, results


def to_numpy_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The 12 scalar statistics only (for CSV rows and plots)."""
    return {k: float(np.float64(metrics[k])) for k in STAT_KEYS if k in metrics}
