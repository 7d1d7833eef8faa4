"""``DataPaths``: where the training and validation data of a run live (``nasfpn train`` / ``eval``),
and ``split_data``: one split of a dataset named by a path, in any format we read.

A dataset path is a COCO root (``annotations/instances_<split>2017.json`` + ``<split>2017/``, or
``annotations/instances_<split>.json`` + ``<split>/``), a COCO ``.json`` file (its image folder
named separately), a YOLO ``data.yaml`` (or a folder holding one) or a Pascal VOC folder
(``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``). The format is detected
(``data.formats.detect_format``) unless named. A YOLO or VOC split is a ``DataSource``: the
COCO dict it reads as goes where a COCO annotation file goes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nasfpn.data.formats import FORMATS, DataSource, detect_format, splits
from nasfpn.data.formats import has_split as source_has_split

Annotations = str | Path | Mapping[str, Any]
"""A COCO annotation file, or a mapping that reads as its dict (a ``DataSource``)."""


@dataclass(frozen=True)
class DataPaths:
    """Where the training and validation data live: annotations (a COCO file or a YOLO / VOC
    ``DataSource``) + the folder their image file names are relative to.

    Without ``val_ann`` the run trains without evaluation (no best checkpoint, empty metrics).
    """

    train_ann: Annotations
    train_images: str | Path
    val_ann: Annotations | None = None
    val_images: str | Path | None = None

    def validation(self) -> tuple[Annotations, str | Path] | None:
        """``(val_ann, val_images)``, or None without validation data; ``ValueError`` for a
        ``val_ann`` given without ``val_images``."""
        if self.val_ann is None:
            return None
        if self.val_images is None:
            raise ValueError("val_ann is given without val_images")
        return self.val_ann, self.val_images

    @classmethod
    def from_root(cls, root: str | Path, require_train: bool = True) -> DataPaths:
        """COCO 2017 (``annotations/instances_{train,val}2017.json``, ``{train,val}2017/``) or our
        synthetic layout (``annotations/instances_{train,val}.json``, ``train/``, ``val/``).

        ``require_train=False`` also accepts a folder with the validation split only (evaluation).
        """
        root = Path(root)
        layouts = [
            (
                root / "annotations" / "instances_train2017.json",
                root / "train2017",
                root / "annotations" / "instances_val2017.json",
                root / "val2017",
            ),
            (
                root / "annotations" / "instances_train.json",
                root / "train",
                root / "annotations" / "instances_val.json",
                root / "val",
            ),
        ]
        for train_ann, train_images, val_ann, val_images in layouts:
            if train_ann.is_file():
                has_val = val_ann.is_file()
                return cls(train_ann, train_images, val_ann if has_val else None, val_images if has_val else None)
            if not require_train and val_ann.is_file():
                return cls(train_ann, train_images, val_ann, val_images)
        raise ValueError(
            f"{root}: found neither COCO 2017 (annotations/instances_train2017.json + train2017/) nor "
            "annotations/instances_train.json + train/; pass --train-ann/--train-images instead"
        )

    @classmethod
    def from_data(
        cls,
        data: str | Path,
        data_format: str | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        train_images: str | Path | None = None,
        val_images: str | Path | None = None,
    ) -> DataPaths:
        """Training and validation splits of a dataset in any format (see the module docstring).

        ``val_split`` None: the ``val`` split where the dataset has one, else no validation; a
        named ``val_split`` must exist. A COCO ``.json`` is the training set alone and needs
        ``train_images``. ``*_images`` replace the image folders the dataset implies.
        """
        fmt = _format(data, data_format)
        train_ann, train_dir = split_data(data, train_split, fmt, train_images)
        if fmt == "coco" and Path(data).is_file():
            return cls(train_ann, train_dir)
        if val_split is None and not has_split(data, "val", fmt):
            return cls(train_ann, train_dir)
        val_ann, val_dir = split_data(data, val_split or "val", fmt, val_images)
        return cls(train_ann, train_dir, val_ann, val_dir)


def _format(data: str | Path, data_format: str | None) -> str:
    if data_format is None:
        return detect_format(data)
    if data_format not in FORMATS:
        raise ValueError(f"data format must be one of {', '.join(FORMATS)}, got {data_format!r}")
    if not Path(data).exists():
        raise ValueError(f"{data}: no such file or folder")
    return data_format


def _coco_split(root: Path, split: str) -> tuple[Path, Path] | None:
    for ann, images in (
        (root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017"),
        (root / "annotations" / f"instances_{split}.json", root / split),
    ):
        if ann.is_file():
            return ann, images
    return None


def has_split(data: str | Path, split: str, data_format: str | None = None) -> bool:
    """Whether the dataset at ``data`` has the split ``split`` (a COCO file has every split)."""
    fmt = _format(data, data_format)
    if fmt == "coco":
        return Path(data).is_file() or _coco_split(Path(data), split) is not None
    return source_has_split(data, fmt, split)


def split_data(
    data: str | Path, split: str, data_format: str | None = None, images: str | Path | None = None
) -> tuple[Annotations, Path]:
    """``(annotations, image folder)`` of one split of the dataset at ``data``; ``images`` replaces
    the image folder. ``ValueError`` naming what is missing and the splits there are."""
    fmt = _format(data, data_format)
    path = Path(data)
    if fmt == "coco":
        if path.is_file():
            if images is None:
                raise ValueError(
                    f"{path}: a COCO annotation file needs the folder of its images "
                    "(--train-images / --val-images; check-data: IMAGE_DIR)"
                )
            return path, Path(images)
        found = _coco_split(path, split)
        if found is None:
            have = sorted(p.stem.removeprefix("instances_") for p in (path / "annotations").glob("instances_*.json"))
            raise ValueError(
                f"{path}: no annotations/instances_{split}2017.json or annotations/instances_{split}.json "
                f"(splits there: {', '.join(have) or 'none'})"
            )
        return found[0], Path(images) if images is not None else found[1]
    if not source_has_split(path, fmt, split):
        have = splits(path, fmt)
        where = "data.yaml" if fmt == "yolo" else "ImageSets/Main"
        raise ValueError(f"{path}: no split {split!r} ({where} has: {', '.join(have) or 'none'})")
    source = DataSource(path, split, fmt)
    return source, Path(images) if images is not None else source.image_dir


def dataset_splits(
    data: str | Path,
    data_format: str | None = None,
    names: list[str] | None = None,
    images: str | Path | None = None,
) -> list[tuple[str | None, Annotations, Path]]:
    """``[(split, annotations, image folder)]`` to check: the ``names`` splits, else ``train`` and
    ``val`` where the dataset has them (else every split it names). A COCO ``.json`` is its one
    split (``None``) and needs ``images``."""
    fmt = _format(data, data_format)
    if fmt == "coco" and Path(data).is_file():
        ann, folder = split_data(data, "", fmt, images)
        return [(None, ann, folder)]
    if not names:
        names = [s for s in ("train", "val") if has_split(data, s, fmt)]
        if not names and fmt != "coco":
            names = splits(data, fmt)
    if not names:
        raise ValueError(f"{data}: no train or val split found; name one with --split")
    return [(s, *split_data(data, s, fmt, images)) for s in names]
