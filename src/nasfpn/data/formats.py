"""Dataset formats: which one a path is (COCO, YOLO, Pascal VOC), and ``DataSource``, one split of
a YOLO or VOC dataset that reads as the COCO dict every part of the package takes.

A ``DataSource`` goes wherever a COCO annotation file goes (``CocoDataset``, ``check_dataset``,
evaluation): it is a read-only mapping with the dict's ``images``, ``annotations`` and
``categories``, read on first use and kept. Its file names are relative to ``image_dir``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from nasfpn.data.problems import ReadResult
from nasfpn.data.voc import read_voc, voc_splits
from nasfpn.data.yolo import read_data_yaml, read_yolo, yolo_splits

FORMATS = ("coco", "yolo", "voc")
_YAML_SUFFIXES = (".yaml", ".yml")


def detect_format(path: str | Path) -> str:
    """``"coco"``, ``"yolo"`` or ``"voc"`` for a dataset path: a data.yaml (or a folder holding one)
    is YOLO, a folder with ``Annotations/`` is VOC, a ``.json`` file or a folder with
    ``annotations/instances_*.json`` is COCO. ``ValueError`` saying what was looked for otherwise."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() in _YAML_SUFFIXES:
            return "yolo"
        if path.suffix.lower() == ".json":
            return "coco"
        raise ValueError(
            f"{path}: a dataset file is a YOLO data.yaml or a COCO .json; name the format with --data-format"
        )
    if (path / "Annotations").is_dir():
        return "voc"
    if (path / "data.yaml").is_file():
        return "yolo"
    if any((path / "annotations").glob("instances_*.json")):
        return "coco"
    hint = ""
    if any((path / f"VOC{y}").is_dir() for y in ("2007", "2012")):
        hint = f"; for Pascal VOC give the year's folder, e.g. {path / 'VOC2007'}"
    raise ValueError(
        f"{path}: not a dataset folder we know: no data.yaml (YOLO), no Annotations/ (Pascal VOC), no "
        f"annotations/instances_*.json (COCO){hint}"
    )


def source_path(path: str | Path, data_format: str) -> Path:
    """The path a reader takes: a YOLO folder's data.yaml, else ``path``."""
    path = Path(path)
    if data_format == "yolo" and path.is_dir():
        if not (path / "data.yaml").is_file():
            raise ValueError(f"{path}: no data.yaml in this folder; give the YOLO data.yaml itself")
        return path / "data.yaml"
    return path


def splits(path: str | Path, data_format: str) -> list[str]:
    """The splits a YOLO data.yaml names (train, val, test) or a VOC folder lists in ImageSets/Main."""
    path = source_path(path, data_format)
    if data_format == "yolo":
        return yolo_splits(path)
    if data_format == "voc":
        return voc_splits(path)
    raise ValueError(f"splits() reads YOLO and VOC datasets, not {data_format!r}")


def has_split(path: str | Path, data_format: str, split: str) -> bool:
    """Whether a YOLO data.yaml names ``split`` (any key, not only train / val / test) or a VOC
    folder has ``ImageSets/Main/<split>.txt``."""
    path = source_path(path, data_format)
    if data_format == "yolo":
        return split in read_data_yaml(path).splits
    return split in voc_splits(path) or (path / "ImageSets" / "Main" / f"{split}.txt").is_file()


class DataSource(Mapping[str, Any]):
    """One split of a YOLO (``data.yaml``) or Pascal VOC (dataset folder) dataset, as a COCO dict."""

    def __init__(self, path: str | Path, split: str, data_format: str) -> None:
        if data_format not in ("yolo", "voc"):
            raise ValueError(f"DataSource reads 'yolo' or 'voc' datasets, not {data_format!r}")
        self.format = data_format
        self.path = source_path(path, data_format)
        self.split = split
        self._result: ReadResult | None = None
        self._image_dir: Path | None = None

    @property
    def image_dir(self) -> Path:
        """The folder the file names are relative to: the YOLO root, or VOC's ``JPEGImages``."""
        if self._image_dir is None:
            self._image_dir = read_data_yaml(self.path).root if self.format == "yolo" else self.path / "JPEGImages"
        return self._image_dir

    def read(self) -> ReadResult:
        """The split as a COCO dict, with the reader's problems and the source of every entry (read once)."""
        if self._result is None:
            self._result = (
                read_yolo(self.path, self.split) if self.format == "yolo" else read_voc(self.path, self.split)
            )
        return self._result

    # The mapping: the COCO dict's keys.
    def __getitem__(self, key: str) -> Any:
        return self.read().coco[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.read().coco)

    def __len__(self) -> int:
        return len(self.read().coco)

    def __str__(self) -> str:
        return f"{self.path} ({self.format}, split {self.split})"

    def __repr__(self) -> str:
        return f"DataSource({str(self.path)!r}, {self.split!r}, {self.format!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DataSource):
            return NotImplemented
        return (self.format, self.path, self.split) == (other.format, other.path, other.split)

    def __hash__(self) -> int:
        return hash((self.format, self.path, self.split))

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers started by spawn need only what the source is, not the dict.
        return {**self.__dict__, "_result": None}
