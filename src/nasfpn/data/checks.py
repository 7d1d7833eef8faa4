"""Dataset validation: every problem of a dataset split and its images, in one report.

``check_dataset`` never stops at the first problem. Each ``Problem`` names its kind, the image
file and the annotation id where they apply; for a YOLO or Pascal VOC split (``DataSource``) also
the label file and line, or the XML file and object. Every rule applies to every format: the
readers report what only they can see (a label line with 4 fields, a class index out of range),
then the COCO dict they make goes through the same checks as a COCO file. Error-level problems stop training
(``validate_dataset``) unless invalid data is skipped, in which case ``CocoDataset(exclude=...)``
leaves out exactly the images and annotations they name. Warning-level problems describe data
that training already handles the way MMDetection does (degenerate boxes are dropped, boxes
crossing the border are clipped).

Image checks read only file headers (size and EXIF orientation), in parallel threads, which
keeps COCO train2017 (118k images) to a few minutes at most on a local disk; ``verify=True`` also
decodes every image.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nasfpn.data.formats import DataSource
from nasfpn.data.io import ImageReadError, image_size, read_image, read_json
from nasfpn.data.problems import ERROR, KINDS, WARNING, Problem

__all__ = [
    "ERROR",
    "KINDS",
    "WARNING",
    "DataCheckError",
    "Problem",
    "check_dataset",
    "format_report",
    "has_errors",
    "is_image_size",
    "validate_dataset",
]

logger = logging.getLogger(__name__)


class DataCheckError(ValueError):
    """The dataset has error-level problems; ``problems`` lists them all, the message is the report."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__(
            format_report(problems) + "\nfix the data, or skip invalid images/annotations "
            "(--skip-invalid) to train without them"
        )


def has_errors(problems: Iterable[Problem]) -> bool:
    return any(p.severity == ERROR for p in problems)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    if not _is_number(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def is_image_size(value: Any) -> bool:
    """A positive whole number (``640`` or ``640.0``): a valid JSON image width or height."""
    return _is_finite_number(value) and value > 0 and float(value).is_integer()


# --------------------------------------------------------------------------- JSON checks


def _check_categories(cats: list[Any], out: list[Problem]) -> set[int]:
    ids: set[int] = set()
    for i, cat in enumerate(cats):
        if not isinstance(cat, dict) or "id" not in cat:
            out.append(Problem("missing_key", f"categories[{i}] has no 'id'"))
            continue
        if not _is_int(cat["id"]):
            out.append(Problem("bad_value", f"categories[{i}] id {cat['id']!r} is not an integer"))
            continue
        if cat["id"] in ids:
            out.append(Problem("duplicate_category_id", f"category id {cat['id']} ({cat.get('name')!r}) appears again"))
        ids.add(cat["id"])
    return ids


def _check_images(images: list[Any], out: list[Problem]) -> dict[int, dict[str, Any]]:
    """Valid image entries by id (the first of duplicates)."""
    valid: dict[int, dict[str, Any]] = {}
    seen: set[int] = set()
    for i, img in enumerate(images):
        if not isinstance(img, dict):
            out.append(Problem("bad_value", f"images[{i}] is not an object"))
            continue
        image_id = img.get("id") if _is_int(img.get("id")) else None
        file_name = img.get("file_name") if isinstance(img.get("file_name"), str) else None
        missing = [k for k in ("id", "file_name", "width", "height") if k not in img]
        if missing:
            out.append(Problem("missing_key", f"images[{i}] lacks {missing}", file_name, image_id=image_id))
            continue
        wrong = [k for k in ("width", "height") if not is_image_size(img[k])]
        if image_id is None:
            wrong.insert(0, "id")
        if file_name is None:
            wrong.append("file_name")
        if wrong:
            detail = ", ".join(f"{k}={img[k]!r}" for k in wrong)
            out.append(Problem("bad_value", f"images[{i}] has invalid {detail}", file_name, image_id=image_id))
            continue
        assert image_id is not None  # a non-integer id is in ``wrong``
        if image_id in seen:
            first = valid.get(image_id, {}).get("file_name")
            out.append(
                Problem(
                    "duplicate_image_id",
                    f"image id {image_id} is used again (first by {first!r})",
                    file_name,
                    image_id=image_id,
                )
            )
            continue
        seen.add(image_id)
        valid[image_id] = img
    return valid


def _check_annotations(
    anns: list[Any],
    images: dict[int, dict[str, Any]],
    all_image_ids: set[int],
    category_ids: set[int],
    out: list[Problem],
) -> None:
    seen: set[int] = set()
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict):
            out.append(Problem("bad_value", f"annotations[{i}] is not an object"))
            continue
        ann_id = ann.get("id") if _is_int(ann.get("id")) else None
        image_id = ann.get("image_id") if _is_int(ann.get("image_id")) else None
        img = images.get(image_id) if image_id is not None else None
        file_name = img["file_name"] if img is not None else None
        where = f"annotations[{i}]"
        missing = [k for k in ("id", "image_id", "category_id", "bbox") if k not in ann]
        if missing:
            out.append(Problem("missing_key", f"{where} lacks {missing}", file_name, ann_id, image_id))
            if "id" in missing:
                continue
        if ann_id is None:
            out.append(Problem("bad_value", f"{where} id {ann['id']!r} is not an integer", file_name, None, image_id))
            continue
        if ann_id in seen:
            out.append(
                Problem("duplicate_annotation_id", f"annotation id {ann_id} is used again", file_name, ann_id, image_id)
            )
        seen.add(ann_id)
        if "image_id" in ann:
            if image_id is None:
                out.append(
                    Problem("bad_value", f"{where} image_id {ann['image_id']!r} is not an integer", None, ann_id)
                )
            elif image_id not in all_image_ids:
                out.append(
                    Problem("unknown_image_id", f"image id {image_id} is not in 'images'", None, ann_id, image_id)
                )
        if "category_id" in ann and not (_is_int(ann["category_id"]) and ann["category_id"] in category_ids):
            out.append(
                Problem(
                    "unknown_category_id",
                    f"category id {ann['category_id']!r} is not in 'categories'",
                    file_name,
                    ann_id,
                    image_id,
                )
            )
        if "bbox" not in ann:
            continue
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_finite_number(v) for v in bbox)):
            out.append(
                Problem(
                    "bad_coordinates",
                    f"bbox {bbox!r} is not 4 finite numbers [x, y, w, h]",
                    file_name,
                    ann_id,
                    image_id,
                )
            )
            continue
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            out.append(
                Problem("nonpositive_box", f"bbox {bbox} has width {w:g} and height {h:g}", file_name, ann_id, image_id)
            )
            continue
        if img is None:
            continue
        width, height = int(img["width"]), int(img["height"])
        if x >= width or y >= height or x + w <= 0 or y + h <= 0:
            out.append(
                Problem(
                    "box_outside_image",
                    f"bbox {bbox} lies outside the {width}x{height} image",
                    file_name,
                    ann_id,
                    image_id,
                )
            )
        elif x < 0 or y < 0 or x + w > width or y + h > height:
            out.append(
                Problem(
                    "box_partly_outside",
                    f"bbox {bbox} (x2={x + w:g}, y2={y + h:g}) crosses the border of the {width}x{height} image",
                    file_name,
                    ann_id,
                    image_id,
                )
            )


# --------------------------------------------------------------------------- image checks


def _check_image_file(image_dir: Path, img: dict[str, Any], verify: bool) -> Problem | None:
    name, image_id = img["file_name"], img["id"]
    path = image_dir / name
    if not path.is_file():
        return Problem("missing_image", f"{path} does not exist", name, image_id=image_id)
    try:
        if verify:
            h, w = read_image(path).shape[:2]
        else:
            h, w = image_size(path)
    except ImageReadError as e:
        return Problem("unreadable_image", str(e), name, image_id=image_id)
    json_h, json_w = int(img["height"]), int(img["width"])
    if (h, w) != (json_h, json_w):
        hint = " (width and height swapped: EXIF orientation?)" if (h, w) == (json_w, json_h) else ""
        return Problem(
            "size_mismatch", f"JSON says {json_h}x{json_w} (HxW), the file is {h}x{w}{hint}", name, image_id=image_id
        )
    return None


def _check_coco(
    data: Mapping[str, Any],
    where: str,
    image_dir: Path,
    check_images: bool,
    verify: bool,
    workers: int | None,
    progress: bool,
    already_checked: frozenset[int] = frozenset(),
) -> list[Problem]:
    """Every problem of a parsed COCO dict (``where`` names it in file-level problems)."""
    out: list[Problem] = []
    parts: dict[str, list[Any]] = {}
    for key in ("images", "annotations", "categories"):
        if key not in data:
            out.append(Problem("missing_key", f"top-level key {key!r} is missing", where))
        elif not isinstance(data[key], list):
            out.append(Problem("bad_value", f"top-level {key!r} is not a list", where))
        parts[key] = data[key] if isinstance(data.get(key), list) else []

    category_ids = _check_categories(parts["categories"], out)
    images = _check_images(parts["images"], out)
    all_image_ids = {img["id"] for img in parts["images"] if isinstance(img, dict) and _is_int(img.get("id"))}
    _check_annotations(parts["annotations"], images, all_image_ids, category_ids, out)

    # Images a reader has opened already exist and have their files' sizes; only decoding is left.
    entries = [img for img in images.values() if verify or img["id"] not in already_checked]
    if check_images and entries:
        workers = workers or min(32, (os.cpu_count() or 1) * 4)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results: Iterable[Problem | None] = pool.map(
                lambda img: _check_image_file(image_dir, img, verify), entries, chunksize=64
            )
            if progress:
                results = tqdm(results, total=len(entries), desc="check images", unit="img")
            out.extend(p for p in results if p is not None)
    return out


def _check_source(
    source: DataSource,
    image_dir: Path | None,
    check_images: bool,
    verify: bool,
    workers: int | None,
    progress: bool,
) -> list[Problem]:
    """The reader's problems, then those of the COCO dict it made, each with its label file and line."""
    try:
        read = source.read()
        folder = image_dir if image_dir is not None else source.image_dir
    except ValueError as e:
        return [Problem("invalid_dataset", str(e), str(source.path))]
    found = _check_coco(read.coco, str(source), folder, check_images, verify, workers, progress, read.checked_images)
    return list(read.problems) + [read.locate(p) for p in found]


def check_dataset(
    ann_file: str | Path | Mapping[str, Any],
    image_dir: str | Path | None = None,
    check_images: bool = True,
    verify: bool = False,
    workers: int | None = None,
    progress: bool = False,
) -> list[Problem]:
    """Every problem of a dataset split and, with ``check_images``, of its image files.

    ``ann_file``: a COCO annotation file, a ``DataSource`` (a YOLO or VOC split; its problems name
    the label file and line, or the XML file and object) or an in-memory COCO dict. ``image_dir``:
    the folder the file names are relative to (a ``DataSource`` knows its own; not needed without
    ``check_images``).
    ``verify`` decodes each image fully instead of reading its header (slower, finds truncation).
    ``workers`` threads read the files (default: ``min(32, cpu count * 4)``).
    """
    if isinstance(ann_file, DataSource):
        return _check_source(
            ann_file, Path(image_dir) if image_dir is not None else None, check_images, verify, workers, progress
        )
    if image_dir is None and check_images:
        raise ValueError(f"{ann_file}: name the image folder its file names are relative to")
    image_dir = Path(image_dir if image_dir is not None else ".")  # not read without check_images
    if isinstance(ann_file, Mapping):
        return _check_coco(ann_file, str(ann_file), image_dir, check_images, verify, workers, progress)
    ann_file = Path(ann_file)
    try:
        data = read_json(ann_file)
    except OSError as e:
        return [Problem("invalid_json", f"cannot read annotation file: {e}", str(ann_file))]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return [Problem("invalid_json", f"not valid JSON: {e}", str(ann_file))]
    if not isinstance(data, dict):
        return [Problem("invalid_json", f"top level is a {type(data).__name__}, not an object", str(ann_file))]
    return _check_coco(data, str(ann_file), image_dir, check_images, verify, workers, progress)


# --------------------------------------------------------------------------- reporting


def format_report(problems: Sequence[Problem], max_examples: int = 10) -> str:
    """A human-readable report: one section per kind (errors first) with its count and examples."""
    if not problems:
        return "no problems found"
    by_kind: dict[str, list[Problem]] = defaultdict(list)
    for p in problems:
        by_kind[p.kind].append(p)
    counts = Counter(p.severity for p in problems)
    lines = [f"{counts[ERROR]} error(s), {counts[WARNING]} warning(s)"]
    order = sorted(by_kind, key=lambda k: (KINDS[k][0] != ERROR, -len(by_kind[k]), k))
    for kind in order:
        items = by_kind[kind]
        severity, meaning = KINDS[kind]
        lines.append(f"{severity} {kind}: {len(items)} - {meaning}")
        for p in items[:max_examples]:
            lines.append(f"    {p}")
        if len(items) > max_examples:
            lines.append(f"    ... and {len(items) - max_examples} more")
    return "\n".join(lines)


def validate_dataset(
    ann_file: str | Path | Mapping[str, Any],
    image_dir: str | Path | None,
    skip_invalid: bool = False,
    check_images: bool = True,
    verify: bool = False,
    workers: int | None = None,
    progress: bool = False,
) -> list[Problem]:
    """Check a dataset before training: raise ``DataCheckError`` (the full report) on errors unless
    ``skip_invalid``; otherwise log the report and return the problems for ``CocoDataset(exclude=...)``.
    """
    problems = check_dataset(ann_file, image_dir, check_images, verify, workers, progress)
    # Problems of the file as a whole (not JSON, no 'images' list, a broken data.yaml, ...) cannot be skipped.
    whole_file = [
        p
        for p in problems
        if p.kind == "invalid_dataset" or (p.file == str(ann_file) and p.image_id is None and p.annotation_id is None)
    ]
    if whole_file or (has_errors(problems) and not skip_invalid):
        raise DataCheckError(problems)
    if problems:
        logger.warning("dataset %s:\n%s", ann_file, format_report(problems))
    return problems
