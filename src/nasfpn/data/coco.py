"""COCO-format detection datasets: image records, category-id mapping and unreadable-image handling.

Annotations follow MMDetection's ``CocoDataset.parse_data_info``: an annotation is dropped when
its box does not intersect the image (``inter_w * inter_h == 0``, using the JSON width/height),
when ``area <= 0`` or ``w < 1`` or ``h < 1``, or when its category is not one of the dataset's
classes. Crowd boxes (``iscrowd=1``) are then left out of the targets: MMDetection carries them
as "ignored" instances, which RetinaNet's loss does not use. Boxes become xyxy float32.

Unreadable images: a file that fails to decode mid-run is logged once (by name) and, with
``on_read_error="resample"`` (the default, for training), replaced by another index drawn from
the same per-sample generator, so the batch keeps its size and the run stays reproducible; when
``max_read_retries`` replacements in a row are unreadable too, the sample is ``None``.
``on_read_error="skip"`` returns ``None`` at once (for evaluation), and ``"raise"`` re-raises the
``ImageReadError``. The collate functions drop ``None`` samples (training: ``data.collate``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from nasfpn.data.checks import ERROR, Problem, is_image_size
from nasfpn.data.io import ImageReadError, read_image, read_json
from nasfpn.data.transforms import Sample, make_generator

logger = logging.getLogger(__name__)

Transform = Callable[[Sample, torch.Generator], Sample]
READ_ERROR_POLICIES = ("resample", "skip", "raise")


def coco2017_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """``(annotation file, image folder)`` of COCO 2017 under ``root``: ``annotations/instances_{split}2017.json``
    and ``{split}2017/``; ``split`` is ``"train"`` or ``"val"``."""
    if split not in ("train", "val"):
        raise ValueError(f"COCO 2017 split must be 'train' or 'val', got {split!r}")
    root = Path(root)
    return root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017"


def load_coco_json(ann_file: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """The parsed annotation file; ``ValueError`` naming the file if it is missing or not COCO JSON.

    A mapping is taken as the parsed dict itself: an in-memory COCO dict, or a ``DataSource`` (a
    YOLO or Pascal VOC split, ``data.formats``)."""
    if isinstance(ann_file, Mapping):
        path: Any = ann_file
        data: Any = dict(ann_file)
    else:
        path = Path(ann_file)
        try:
            data = read_json(path)
        except OSError as e:
            raise ValueError(f"{path}: cannot read annotation file ({e})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with 'images', 'annotations', 'categories'")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise ValueError(f"{path}: missing or non-list key(s) {missing}")
    return data


_NUMBER_TYPES = (int, float)  # exact types: bool and str are not coordinates
# No image is 2^31 pixels wide or high: a larger size or coordinate is not one (and would overflow
# the int64 / float32 arrays the dataset keeps).
_MAX_PIXELS = 2.0**31


def _finite_box(bbox: Any) -> tuple[float, float, float, float] | None:
    """``(x, y, w, h)`` as floats, or None unless ``bbox`` is a list of 4 finite numbers (of pixels:
    within +-2^31)."""
    if not isinstance(bbox, list) or len(bbox) != 4:
        return None
    x, y, w, h = bbox
    if not (
        type(x) in _NUMBER_TYPES and type(y) in _NUMBER_TYPES and type(w) in _NUMBER_TYPES and type(h) in _NUMBER_TYPES
    ):
        return None
    try:
        # A NaN or an infinity anywhere makes the sum non-finite (this runs once per annotation).
        if not math.isfinite(x + y + w + h):
            return None
    except OverflowError:  # an integer too large for a float
        return None
    if max(abs(x), abs(y), abs(w), abs(h)) >= _MAX_PIXELS:
        return None
    return float(x), float(y), float(w), float(h)


class CocoDataset(Dataset):
    """Images and boxes of a COCO ``instances_*.json`` file (or of a COCO dict: a YOLO / Pascal VOC
    split read by ``data.formats.DataSource``).

    Labels are contiguous ``0..K-1`` over ``category_ids`` (default: every category of the file,
    sorted by id); ``label_to_category_id`` and ``class_names`` map back. ``filter_empty`` drops
    images without a usable box (MMDetection ``filter_empty_gt``, for training); ``min_size``
    drops images whose JSON width or height is smaller (MMDetection ``filter_cfg.min_size``).
    ``exclude``: problems from ``checks.check_dataset``; error-level ones remove the images and
    annotations they name (``skip_invalid``). Malformed annotations are always skipped, with one
    warning giving their count.

    ``dataset[i]`` (or ``dataset[(i, epoch)]``) is a dict: ``image`` uint8 ``(3, H, W)`` (after
    ``transform``), ``boxes`` float32 ``(M, 4)`` xyxy, ``labels`` int64 ``(M,)``, ``image_id``,
    ``file_name``, ``ori_shape`` ``(H, W)`` as read, ``img_shape`` and ``scale_factor``. The
    transform's generator is ``make_generator(seed, epoch, index)``; call ``set_epoch`` before each
    epoch, or have the sampler yield ``(index, epoch)`` keys when workers persist across epochs.
    """

    def __init__(
        self,
        ann_file: str | Path | Mapping[str, Any],
        image_dir: str | Path,
        transform: Transform | None = None,
        *,
        category_ids: Sequence[int] | None = None,
        filter_empty: bool = False,
        min_size: int = 0,
        exclude: Iterable[Problem] = (),
        seed: int = 0,
        on_read_error: str = "resample",
        max_read_retries: int = 10,
        cache_images: bool = False,
    ) -> None:
        if on_read_error not in READ_ERROR_POLICIES:
            raise ValueError(f"on_read_error must be one of {READ_ERROR_POLICIES}, got {on_read_error!r}")
        # A mapping (an in-memory COCO dict, a YOLO / VOC ``DataSource``) is read as it is.
        self.ann_file = ann_file if isinstance(ann_file, Mapping) else Path(ann_file)
        self.image_dir = Path(image_dir)
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.on_read_error = on_read_error
        self.max_read_retries = max_read_retries
        # Decoded images kept by index (``cache_images``): each file is read once per process.
        self._image_cache: dict[int, np.ndarray] | None = {} if cache_images else None
        self._unreadable: set[int] = set()  # indices already reported (per process)

        data = load_coco_json(self.ann_file)
        names_by_id: dict[int, str] = {}
        for cat in data["categories"]:
            if isinstance(cat, dict) and isinstance(cat.get("id"), int):
                names_by_id.setdefault(cat["id"], str(cat.get("name", cat["id"])))
        if category_ids is None:
            category_ids = sorted(names_by_id)
        unknown = [c for c in category_ids if c not in names_by_id]
        if unknown:
            raise ValueError(f"{self.ann_file}: category ids {unknown} are not in the file's categories")
        if len(set(category_ids)) != len(category_ids):
            raise ValueError(f"category_ids has duplicates: {list(category_ids)}")
        self.label_to_category_id: tuple[int, ...] = tuple(int(c) for c in category_ids)
        self.category_id_to_label: dict[int, int] = {c: i for i, c in enumerate(self.label_to_category_id)}
        self.class_names: tuple[str, ...] = tuple(names_by_id[c] for c in self.label_to_category_id)

        bad = [p for p in exclude if p.severity == ERROR]
        bad_images = {p.image_id for p in bad if p.image_id is not None and p.annotation_id is None}
        bad_annotations = {p.annotation_id for p in bad if p.annotation_id is not None}
        self._load(data, bad_images, bad_annotations, filter_empty, min_size)

    # ----------------------------------------------------------------------- loading

    def _load(
        self, data: dict[str, Any], bad_images: set[int], bad_annotations: set[int], filter_empty: bool, min_size: int
    ) -> None:
        images: dict[int, dict[str, Any]] = {}
        duplicated: set[int] = set()
        skipped_images = 0
        for img in data["images"]:
            if not (
                isinstance(img, dict)
                and isinstance(img.get("id"), int)
                and isinstance(img.get("file_name"), str)
                and is_image_size(img.get("width"))
                and is_image_size(img.get("height"))
                and max(img["width"], img["height"]) < _MAX_PIXELS
            ):
                skipped_images += 1
                continue
            if img["id"] in images:
                duplicated.add(img["id"])
            images[img["id"]] = {
                "file_name": img["file_name"],
                "width": int(img["width"]),
                "height": int(img["height"]),
            }
        if duplicated - bad_images:
            raise ValueError(
                f"{self.ann_file}: duplicate image ids {sorted(duplicated - bad_images)[:10]}; "
                "run `nasfpn check-data`, or skip invalid data"
            )

        per_image: dict[int, list[tuple[float, float, float, float, int]]] = {}
        malformed = 0
        for ann in data["annotations"]:
            if not isinstance(ann, dict):
                malformed += 1
                continue
            ann_id = ann.get("id")
            if isinstance(ann_id, int) and ann_id in bad_annotations:
                continue
            image_id = ann.get("image_id")
            img = images.get(image_id) if isinstance(image_id, int) else None
            box = _finite_box(ann.get("bbox"))
            if (
                not isinstance(image_id, int)
                or img is None
                or box is None
                or not isinstance(ann.get("category_id"), int)
            ):
                malformed += 1
                continue
            if ann.get("ignore", False) or ann.get("iscrowd", 0):
                continue
            label = self.category_id_to_label.get(ann["category_id"])
            if label is None:
                continue
            x, y, w, h = box
            inter_w = max(0.0, min(x + w, img["width"]) - max(x, 0.0))
            inter_h = max(0.0, min(y + h, img["height"]) - max(y, 0.0))
            area = ann.get("area", w * h)
            if inter_w * inter_h == 0 or not isinstance(area, (int, float)) or area <= 0 or w < 1 or h < 1:
                continue
            per_image.setdefault(image_id, []).append((x, y, x + w, y + h, label))
        if malformed or skipped_images:
            logger.warning(
                "%s: skipped %d malformed image entries and %d malformed annotations "
                "(run `nasfpn check-data` for details)",
                self.ann_file,
                skipped_images,
                malformed,
            )

        # Flat arrays rather than per-image Python objects: DataLoader workers share them cheaply.
        ids, names, sizes, starts, rows = [], [], [], [0], []
        for image_id, img in images.items():
            if image_id in bad_images or image_id in duplicated:
                continue
            boxes = per_image.get(image_id, [])
            if filter_empty and not boxes:
                continue
            if min(img["width"], img["height"]) < min_size:
                continue
            ids.append(image_id)
            names.append(img["file_name"])
            sizes.append((img["height"], img["width"]))
            rows.extend(boxes)
            starts.append(len(rows))
        table = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
        self.image_ids = np.asarray(ids, dtype=np.int64)
        self.file_names: list[str] = names
        self.json_sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        self._starts = np.asarray(starts, dtype=np.int64)
        self._boxes = table[:, :4].astype(np.float32)
        self._labels = table[:, 4].astype(np.int64)

    # ----------------------------------------------------------------------- access

    @property
    def num_classes(self) -> int:
        return len(self.label_to_category_id)

    def __len__(self) -> int:
        return len(self.image_ids)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used to derive per-sample randomness (call before iterating each epoch)."""
        self.epoch = epoch

    def annotations(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(boxes float32 (M, 4) xyxy, labels int64 (M,))`` of image ``index`` as in the file."""
        a, b = self._starts[index], self._starts[index + 1]
        return self._boxes[a:b], self._labels[a:b]

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.file_names[index]

    def load(self, index: int) -> Sample:
        """The untransformed sample of ``index``; raises ``ImageReadError`` if its file is unreadable."""
        cached = self._image_cache.get(index) if self._image_cache is not None else None
        image = read_image(self.image_path(index)) if cached is None else cached
        if self._image_cache is not None:
            self._image_cache[index] = image
        boxes, labels = self.annotations(index)
        h, w = image.shape[:2]
        return {
            "image": torch.from_numpy(image).permute(2, 0, 1).contiguous(),
            "boxes": torch.from_numpy(boxes.copy()),
            "labels": torch.from_numpy(labels.copy()),
            "image_id": int(self.image_ids[index]),
            "file_name": self.file_names[index],
            "ori_shape": (h, w),
            "img_shape": (h, w),
            "scale_factor": (1.0, 1.0),
        }

    def __getitem__(self, key: int | tuple[int, int]) -> Sample | None:
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        generator = make_generator(self.seed, epoch, index)
        candidate = index
        for _ in range(self.max_read_retries + 1):
            try:
                sample = self.load(candidate)
                break
            except ImageReadError as e:
                if self.on_read_error == "raise":
                    raise
                if candidate not in self._unreadable:
                    self._unreadable.add(candidate)
                    logger.warning("skipping unreadable image: %s", e)
                if self.on_read_error == "skip":
                    return None
                # Deterministic replacement: the draw comes from this sample's own generator.
                candidate = int(torch.randint(0, len(self), (), generator=generator))
        else:
            logger.warning(
                "skipping sample %d: %d images in a row were unreadable (last: %s); check the image folder",
                index,
                self.max_read_retries + 1,
                self.image_path(candidate),
            )
            return None
        return self.transform(sample, generator) if self.transform is not None else sample
