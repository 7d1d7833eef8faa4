"""``nasfpn convert-data``: a YOLO or Pascal VOC dataset written out as COCO annotation files.

Each split becomes ``<out>/instances_<split>.json`` (written atomically). The images are not
copied: their file names are relative to the source's image folder (the YOLO root, or VOC's
``JPEGImages``), which is what ``--train-images`` / ``--val-images`` name afterwards. The files
hold exactly the COCO dict training and evaluation read from the source directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nasfpn.core.fileio import write_json_atomic
from nasfpn.data.checks import ERROR, check_dataset, format_report
from nasfpn.data.formats import DataSource, detect_format, splits


@dataclass(frozen=True)
class ConvertedSplit:
    split: str
    ann_file: Path
    image_dir: Path
    images: int
    annotations: int
    skipped: int
    """Error-level problems left out (with ``skip_invalid``)."""


def convert_to_coco(
    path: str | Path,
    out_dir: str | Path,
    data_format: str | None = None,
    split_names: list[str] | None = None,
    skip_invalid: bool = False,
) -> list[ConvertedSplit]:
    """Write the splits (default: every split the dataset names) of a YOLO / VOC dataset as COCO files.

    Error-level problems in any split refuse the conversion (``ValueError`` with the report; no
    file is written) unless ``skip_invalid``, which leaves out the objects and images they name.
    """
    fmt = data_format or detect_format(path)
    if fmt == "coco":
        raise ValueError(f"{path}: already COCO; nothing to convert")
    names = split_names or splits(path, fmt)
    if not names:
        raise ValueError(f"{path}: names no splits; give --split")
    checked = []
    for split in names:  # every split is checked before any file is written
        source = DataSource(path, split, fmt)
        problems = check_dataset(source, check_images=False)
        errors = [p for p in problems if p.severity == ERROR]
        if any(p.kind == "invalid_dataset" for p in errors) or (errors and not skip_invalid):
            raise ValueError(
                f"{source}:\n{format_report(problems)}\nfix the data, or convert without the invalid "
                "images and objects (--skip-invalid)"
            )
        checked.append((source, errors))
    done = []
    for source, errors in checked:
        coco = source.read().coco
        bad_images = {p.image_id for p in errors if p.image_id is not None and p.annotation_id is None}
        bad_annotations = {p.annotation_id for p in errors if p.annotation_id is not None}
        kept = {
            "images": [img for img in coco["images"] if img["id"] not in bad_images],
            "annotations": [
                a for a in coco["annotations"] if a["id"] not in bad_annotations and a["image_id"] not in bad_images
            ],
            "categories": coco["categories"],
        }
        ann_file = write_json_atomic(kept, Path(out_dir) / f"instances_{source.split}.json")
        done.append(
            ConvertedSplit(
                source.split, ann_file, source.image_dir, len(kept["images"]), len(kept["annotations"]), len(errors)
            )
        )
    return done
