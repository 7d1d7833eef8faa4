"""Ultralytics YOLO detection datasets, read into the COCO dict the rest of the package uses.

Layout: a ``data.yaml`` with

* ``path``: the dataset root, absolute or relative to the data.yaml's folder (else to the
  working directory); default: the data.yaml's folder;
* ``train``, ``val`` (and ``test``): image folders (searched recursively), list files (``.txt``,
  one image path per line; ``./x`` is relative to the list file, other relative paths to the
  root), or lists of those, relative to the root;
* ``names``: the class names, as a list or as a mapping ``{0: name, 1: name, ...}``.

The labels of ``<...>/images/<rest>/x.jpg`` are in ``<...>/labels/<rest>/x.txt`` (the last
``images`` folder of the path becomes ``labels``), one ``class cx cy w h`` line per object: the
class index and the box centre and size as fractions (0..1) of the image width and height. An
image without a label file, or with an empty one, has no objects.

The COCO dict: image ids ``1..N`` in the split's order (each folder sorted by path), file names
relative to the root (the split's image folder), sizes from the image headers (EXIF orientation
applied, as the pixels are read); class ``i`` gets the category id ``label_category_ids`` gives
label ``i`` (``i + 1``; COCO's ids for 80 classes, the rule predictions follow). Boxes become
pixels: ``x1 = (cx - w/2) * W`` and ``x2 = (cx + w/2) * W`` (``y`` likewise with ``H``), each
rounded to 1/1000 pixel, then ``bbox = [x1, y1, x2 - x1, y2 - y1]``: integer pixel boxes written
with 10 or more significant digits come back exactly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nasfpn.core.classes import label_category_ids
from nasfpn.data.io import IMAGE_EXTENSIONS, ImageReadError, image_size
from nasfpn.data.problems import Problem, ReadResult

STANDARD_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class YoloSpec:
    """What a data.yaml says: the dataset root, class names and each split's entries."""

    yaml: Path
    root: Path
    names: tuple[str, ...]
    splits: dict[str, tuple[str, ...]]


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text file ({e})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    except (ValueError, RecursionError) as e:  # a date like 2001-02-30, nesting too deep for the parser
        raise ValueError(f"{path}: not valid YAML ({type(e).__name__}: {e})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping with 'path', 'train', 'val' and 'names'")
    return loaded


def _names(path: Path, doc: dict[str, Any]) -> tuple[str, ...]:
    names = doc.get("names")
    hint = "write e.g. 'names: [cat, dog]' or 'names: {0: cat, 1: dog}'"
    if isinstance(names, dict):
        keys = list(names)
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in keys) or sorted(keys) != list(
            range(len(keys))
        ):
            raise ValueError(f"{path}: the keys of 'names' must be the class indices 0..{len(keys) - 1}; {hint}")
        values = [names[i] for i in range(len(keys))]
    elif isinstance(names, list):
        values = names
    else:
        raise ValueError(f"{path}: 'names' (the class names) is missing or not a list or mapping; {hint}")
    if not values or not all(isinstance(v, (str, int)) and not isinstance(v, bool) and str(v) for v in values):
        raise ValueError(f"{path}: 'names' must hold at least one class name, each a non-empty string; {hint}")
    out = tuple(str(v) for v in values)
    nc = doc.get("nc")
    if nc is not None and nc != len(out):
        raise ValueError(f"{path}: 'nc: {nc}' but 'names' has {len(out)} entries; make them agree (or drop nc)")
    return out


def _expand(value: str, path: Path, key: str) -> Path:
    """``value`` with ``~`` / ``~user`` expanded; ``ValueError`` naming the data.yaml for an unknown user."""
    try:
        return Path(value).expanduser()
    except RuntimeError:  # "Could not determine home directory"
        raise ValueError(f"{path}: '{key}: {value}' starts with ~ but that user's home folder is unknown") from None


def _root(path: Path, doc: dict[str, Any]) -> Path:
    value = doc.get("path")
    if value is None or value == "":
        return path.parent
    if not isinstance(value, str):
        raise ValueError(f"{path}: 'path' must be the dataset folder, got {value!r}")
    given = _expand(value, path, "path")
    candidates = [given] if given.is_absolute() else [Path(os.path.normpath(path.parent / given)), given]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise ValueError(
        f"{path}: dataset root 'path: {value}' is not a folder (looked for {', '.join(map(str, candidates))}); "
        "set 'path' to the dataset folder, absolute or relative to the data.yaml's folder"
    )


def read_data_yaml(path: str | Path) -> YoloSpec:
    """The data.yaml at ``path``; ``ValueError`` naming the file and the fix for anything malformed."""
    path = Path(path)
    doc = _load_yaml(path)
    names = _names(path, doc)
    root = _root(path, doc)
    splits: dict[str, tuple[str, ...]] = {}
    for key, value in doc.items():
        if key in ("path", "names", "nc", "download") or not value:
            continue
        entries = value if isinstance(value, list) else [value]
        if all(isinstance(e, str) and e for e in entries):
            splits[str(key)] = tuple(entries)
        elif key in STANDARD_SPLITS:
            raise ValueError(f"{path}: '{key}' must be an image folder, a list file or a list of those, got {value!r}")
    return YoloSpec(path, root, names, splits)


def yolo_splits(path: str | Path) -> list[str]:
    """The standard splits (train, val, test) the data.yaml names."""
    spec = read_data_yaml(path)
    return [s for s in STANDARD_SPLITS if s in spec.splits]


def label_path(image: Path) -> Path:
    """The label file of ``image``: its last ``images`` folder becomes ``labels``, the suffix ``.txt``."""
    parts = image.parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            return Path(*parts[:i], "labels", *parts[i + 1 :]).with_suffix(".txt")
    return image.with_suffix(".txt")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _split_images(
    spec: YoloSpec, split: str
) -> tuple[list[tuple[Path, str | None]], list[Path], list[tuple[str, str, str]]]:
    """``([(image, where it is listed)], image folders, [(kind, message, location)])`` of a split."""
    if split not in spec.splits:
        named = ", ".join(spec.splits) or "none"
        raise ValueError(f"{spec.yaml}: no '{split}' entry (splits named: {named}); add '{split}: images/{split}'")
    images: list[tuple[Path, str | None]] = []
    folders: list[Path] = []
    listed: list[tuple[str, str, str]] = []
    for entry in spec.splits[split]:
        given = _expand(entry, spec.yaml, split)
        path = given if given.is_absolute() else Path(os.path.normpath(spec.root / given))
        if path.is_dir():
            folders.append(path)
            images.extend((p, None) for p in sorted(p for p in path.rglob("*") if _is_image(p)))
        elif path.is_file():
            try:
                lines = path.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"{spec.yaml}: {split} list file {path} cannot be read ({e})") from None
            for n, line in enumerate(lines, 1):
                name = line.strip()
                if not name:
                    continue
                rel = Path(name[2:]) if name.startswith("./") else Path(name)
                image = rel if rel.is_absolute() else (path.parent if name.startswith("./") else spec.root) / rel
                image = Path(os.path.normpath(image))
                if image.is_file():
                    images.append((image, f"{path}:{n}"))
                else:
                    listed.append(("missing_image", f"{image} does not exist", f"{path}:{n}"))
        else:
            raise ValueError(
                f"{spec.yaml}: {split} entry '{entry}' is neither a folder nor a list file ({path} does not exist)"
            )
    if not images and not listed:
        raise ValueError(f"{spec.yaml}: split '{split}' has no images ({', '.join(spec.splits[split])})")
    return images, folders, listed


def _parse_line(fields: list[str], num_classes: int) -> tuple[str, str] | tuple[int, float, float, float, float]:
    """``(class, cx, cy, w, h)``, or ``(kind, message)`` of what is wrong with the line."""
    if len(fields) != 5:
        text = " ".join(fields)
        shown = text if len(text) <= 60 else text[:57] + "..."
        hint = " (a segment polygon? only box labels are read)" if len(fields) >= 7 and len(fields) % 2 else ""
        return "bad_label_line", f"{len(fields)} field(s) '{shown}', expected 5: class cx cy w h{hint}"
    try:
        cls = float(fields[0])
    except ValueError:
        cls = math.nan
    if not (cls.is_integer() and 0 <= cls < num_classes):
        return (
            "unknown_category_id",
            f"class {fields[0]!r} is not a class index 0..{num_classes - 1} (data.yaml names {num_classes})",
        )
    values = []
    for name, token in zip(("cx", "cy", "w", "h"), fields[1:]):
        try:
            value = float(token)
        except ValueError:
            return "bad_coordinates", f"{name} {token!r} is not a number"
        if not math.isfinite(value):
            return "bad_coordinates", f"{name} {token!r} is not a finite number"
        values.append(value)
    outside = [f"{n}={t}" for n, t, v in zip(("cx", "cy", "w", "h"), fields[1:], values) if not 0.0 <= v <= 1.0]
    if outside:
        return (
            "not_normalized",
            f"{', '.join(outside)} outside 0..1: YOLO boxes are fractions of the image width and height",
        )
    cx, cy, w, h = values
    return int(cls), cx, cy, w, h


def to_pixels(cx: float, cy: float, w: float, h: float, width: int, height: int) -> list[float]:
    """COCO ``[x, y, w, h]`` pixels of a normalised YOLO box (corners rounded to 1/1000 pixel)."""
    x1, x2 = round((cx - w / 2) * width, 3) + 0.0, round((cx + w / 2) * width, 3) + 0.0
    y1, y2 = round((cy - h / 2) * height, 3) + 0.0, round((cy + h / 2) * height, 3) + 0.0
    return [x1, y1, round(x2 - x1, 3) + 0.0, round(y2 - y1, 3) + 0.0]


def _header(path: Path) -> tuple[int, int] | ImageReadError:
    try:
        return image_size(path)
    except ImageReadError as e:
        return e


def _unmatched_labels(folders: list[Path], used: set[Path]) -> Iterator[Path]:
    for folder in folders:
        labels = label_path(folder / "x").parent
        if labels.is_dir():
            for p in sorted(labels.rglob("*.txt")):
                if p not in used and p.name != "classes.txt":
                    yield p


def read_yolo(path: str | Path, split: str, workers: int | None = None) -> ReadResult:
    """One split of the YOLO dataset described by the data.yaml at ``path``, as a COCO dict.

    Dataset-level problems (a malformed data.yaml, a split folder that does not exist) raise
    ``ValueError``; problems of single images and label lines are in the result's ``problems``.
    """
    spec = read_data_yaml(path)
    images, folders, listed = _split_images(spec, split)
    problems = [Problem(kind, message, location=where) for kind, message, where in listed]
    category_ids = label_category_ids(len(spec.names))
    coco: dict[str, Any] = {
        "images": [],
        "annotations": [],
        "categories": [{"id": c, "name": n} for c, n in zip(category_ids, spec.names)],
    }
    result = ReadResult(coco, problems)
    with ThreadPoolExecutor(max_workers=workers or min(32, (os.cpu_count() or 1) * 4)) as pool:
        sizes = list(pool.map(_header, [p for p, _ in images], chunksize=64))
    seen: dict[Path, str] = {}
    used_labels: set[Path] = set()
    checked: set[int] = set()
    next_ann = 1
    image_id = 0
    for (image, where), size in zip(images, sizes):
        try:
            file_name = image.relative_to(spec.root).as_posix()
        except ValueError:
            file_name = str(image)
        if image in seen:
            problems.append(
                Problem(
                    "duplicate_image_id",
                    f"{file_name} is listed again (first at {seen[image]})",
                    file_name,
                    None,
                    None,
                    where,
                )
            )
            continue
        seen[image] = where or file_name
        image_id += 1
        labels = label_path(image)
        used_labels.add(labels)
        result.image_locations[image_id] = str(labels)
        if isinstance(size, ImageReadError):
            kind = "missing_image" if not image.is_file() else "unreadable_image"
            problems.append(Problem(kind, str(size), file_name, None, image_id, where or str(labels)))
        else:
            height, width = size
            coco["images"].append({"id": image_id, "file_name": file_name, "width": width, "height": height})
            checked.add(image_id)
        if not labels.is_file():
            continue
        try:
            lines = labels.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            problems.append(Problem("bad_label_file", f"cannot read it ({e})", file_name, None, image_id, str(labels)))
            continue
        for n, line in enumerate(lines, 1):
            fields = line.split()
            if not fields:
                continue
            ann_id, next_ann = next_ann, next_ann + 1
            where_line = f"{labels}:{n}"
            result.annotation_locations[ann_id] = where_line
            parsed = _parse_line(fields, len(spec.names))
            if isinstance(parsed[0], str):
                kind, message = parsed
                problems.append(Problem(str(kind), str(message), file_name, ann_id, image_id, where_line))
                continue
            if isinstance(size, ImageReadError):
                continue
            cls, cx, cy, w, h = parsed
            bbox = to_pixels(float(cx), float(cy), float(w), float(h), width, height)
            coco["annotations"].append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": category_ids[int(cls)],
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                }
            )
    for orphan in _unmatched_labels(folders, used_labels):
        problems.append(
            Problem("unmatched_label", "no image of this name in the split's image folders", location=str(orphan))
        )
    result.checked_images = frozenset(checked)
    return result
