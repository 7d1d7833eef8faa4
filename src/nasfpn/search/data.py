"""A user's dataset for a search: one split of a COCO, YOLO or Pascal VOC folder as a COCO json.

The proxy task trains from COCO annotation files (they are split, pickled into worker
processes and saved in ``search.json``), so a YOLO or VOC split is read once through
``data.formats.DataSource`` and written as ``{work_dir}/data/{split}.json``; its images stay
where they are (the json's file names are relative to the folder returned with it).
"""

from __future__ import annotations

import json
from pathlib import Path

from nasfpn.core.fileio import write_text_atomic
from nasfpn.data.formats import FORMATS, DataSource, detect_format


def dataset_split(path: str | Path, split: str, work_dir: str | Path, data_format: str = "auto") -> tuple[Path, Path]:
    """``(COCO json, image folder)`` of ``split`` (``train``, ``val``, ...) of the dataset at
    ``path``. COCO: ``annotations/instances_{split}.json`` + ``{split}/`` (or COCO 2017's
    ``instances_{split}2017.json`` + ``{split}2017/``); YOLO and VOC: converted under ``work_dir``."""
    path = Path(path)
    fmt = detect_format(path) if data_format == "auto" else data_format
    if fmt not in FORMATS:
        raise ValueError(f"data format must be one of {', '.join(FORMATS)} or auto, got {data_format!r}")
    if fmt == "coco":
        for ann, images in (
            (path / "annotations" / f"instances_{split}.json", path / split),
            (path / "annotations" / f"instances_{split}2017.json", path / f"{split}2017"),
        ):
            if ann.is_file() and images.is_dir():
                return ann, images
        raise ValueError(
            f"{path}: no annotations/instances_{split}.json + {split}/ (or COCO 2017's "
            f"instances_{split}2017.json + {split}2017/)"
        )
    source = DataSource(path, split, fmt)
    out = Path(work_dir) / "data" / f"{split}.json"
    text = json.dumps(dict(source.read().coco))
    out.parent.mkdir(parents=True, exist_ok=True)
    if not (out.is_file() and out.read_text() == text):
        write_text_atomic(text, out)
    return out, source.image_dir
