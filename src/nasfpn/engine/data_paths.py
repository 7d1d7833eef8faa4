"""``DataPaths``: where the training and validation data of a run live (``nasfpn train`` / ``eval``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataPaths:
    """Where the training and validation data live (COCO-format annotation files + image folders).

    Without ``val_ann`` the run trains without evaluation (no best checkpoint, empty metrics).
    """

    train_ann: str | Path
    train_images: str | Path
    val_ann: str | Path | None = None
    val_images: str | Path | None = None

    def validation(self) -> tuple[str | Path, str | Path] | None:
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
