"""Pascal VOC detection datasets, read into the COCO dict the rest of the package uses.

Layout (``VOCdevkit/VOC2007`` and folders like it): ``Annotations/<id>.xml``,
``JPEGImages/<image>``, ``ImageSets/Main/<split>.txt`` (one image id, the XML's name without
``.xml``, per line). The image is ``JPEGImages/<filename>`` of the XML when that file exists,
else ``JPEGImages/<id>.jpg`` (or another image suffix); its size is the XML's ``<size>``, or the
image header's where ``<size>`` is missing or zero.

Classes: ``classes.txt`` (one name per line) or ``labelmap.txt`` (CVAT's export, ``name:color::``
lines) in the dataset folder if there is one, else the 20 VOC classes; class ``i`` gets the
category id ``label_category_ids`` gives label ``i`` (``i + 1``).

Boxes: VOC's ``xmin..xmax`` are 1-based pixel indices, both ends included, so the box covers the
continuous range ``xmin - 1 .. xmax``: ``bbox = [xmin - 1, ymin - 1, xmax - xmin + 1,
ymax - ymin + 1]`` (integer coordinates stay integers).

Difficult objects: ``<difficult>1</difficult>`` becomes ``iscrowd=1``, which our COCO path
treats as "ignore": left out of the training targets (MMDetection's ignored instances, which
RetinaNet does not use), and in evaluation (faster_coco_eval) neither a miss when undetected nor
a false positive when detected, as VOC's own rule says. One difference from VOC's evaluation
code: COCO matches a detection to an ignored box by the intersection over the detection's area
rather than by IoU.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nasfpn.core.classes import label_category_ids
from nasfpn.data.io import IMAGE_EXTENSIONS, ImageReadError, image_size
from nasfpn.data.problems import Problem, ReadResult

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
_COORDS = ("xmin", "ymin", "xmax", "ymax")


def voc_classes(root: str | Path) -> tuple[tuple[str, ...], str]:
    """``(class names, where they come from)``: classes.txt, labelmap.txt, or the 20 VOC classes."""
    root = Path(root)
    for name in ("classes.txt", "labelmap.txt"):
        path = root / name
        if not path.is_file():
            continue
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot read the class list ({e})") from None
        if name == "labelmap.txt":  # CVAT: "# label:color_rgb:parts:actions", then "name:r,g,b::"
            names = [line.split(":")[0].strip() for line in lines if line.strip() and not line.startswith("#")]
            names = [n for n in names if n and n != "background"]
        else:
            names = [line.strip() for line in lines if line.strip()]
        if not names:
            raise ValueError(f"{path}: lists no class names")
        if len(set(names)) != len(names):
            raise ValueError(f"{path}: a class name appears twice")
        return tuple(names), str(path)
    return VOC_CLASSES, "the 20 VOC classes"


def _check_root(root: Path) -> None:
    if not (root / "Annotations").is_dir():
        hint = ""
        if any((root / f"VOC{y}").is_dir() for y in ("2007", "2012")):
            hint = f"; give the year's folder, e.g. {root / 'VOC2007'}"
        raise ValueError(f"{root}: not a Pascal VOC folder (no Annotations/ folder){hint}")


def voc_splits(root: str | Path) -> list[str]:
    """The splits of ``ImageSets/Main`` (``train``, ``val``, ``trainval``, ``test``, ...), without
    the per-class lists (``<class>_<split>.txt``)."""
    root = Path(root)
    _check_root(root)
    main = root / "ImageSets" / "Main"
    if not main.is_dir():
        return []
    classes = set(voc_classes(root)[0])
    stems = sorted(p.stem for p in main.glob("*.txt"))
    return [s for s in stems if not ("_" in s and s.rsplit("_", 1)[0] in classes)]


def _split_ids(root: Path, split: str) -> tuple[Path, list[str]]:
    _check_root(root)
    path = root / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        have = voc_splits(root)
        listed = f"splits there: {', '.join(have)}" if have else "there is no ImageSets/Main/*.txt"
        raise ValueError(
            f"{root}: no split list {path} ({listed}); write one image id (XML name without .xml) per line"
        )
    try:
        return path, path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the split list ({e})") from None


def _image_file(images: Path, image_id: str, filename: str) -> str:
    """The image's file name under JPEGImages (the expected one when no file exists)."""
    if filename and (images / filename).is_file():
        return filename
    for suffix in (".jpg", *sorted(IMAGE_EXTENSIONS - {".jpg"})):
        if (images / f"{image_id}{suffix}").is_file():
            return f"{image_id}{suffix}"
    return filename or f"{image_id}.jpg"


def _size(tree: ET.Element) -> tuple[int, int] | None:
    """``(H, W)`` of the XML's ``<size>``, or None where it is missing, zero, not a number or no
    image's (2^31 pixels or more)."""
    try:
        width = float(tree.findtext("size/width") or "")
        height = float(tree.findtext("size/height") or "")
    except ValueError:
        return None
    if not (1 <= width < 2**31 and 1 <= height < 2**31):  # NaN fails too
        return None
    return int(height), int(width)


def _object(
    obj: ET.Element, index: dict[str, int], classes_from: str
) -> tuple[str, str] | tuple[int, list[float], int]:
    """``(class index, [xmin, ymin, xmax, ymax], difficult)``, or ``(kind, message)``."""
    name = (obj.findtext("name") or "").strip()
    if not name:
        return "missing_key", "<object> has no <name>"
    if name not in index:
        return (
            "unknown_category_id",
            f"name {name!r} is not one of the {len(index)} classes ({classes_from}); "
            "list your classes in classes.txt in the dataset folder, one per line",
        )
    box = obj.find("bndbox")
    if box is None:
        return "missing_key", "<object> has no <bndbox>"
    values = []
    for tag in _COORDS:
        text = box.findtext(tag)
        if text is None:
            return "missing_key", f"<bndbox> has no <{tag}>"
        try:
            value = float(text)
        except ValueError:
            return "bad_coordinates", f"<{tag}>{text.strip()}</{tag}> is not a number"
        if not math.isfinite(value):
            return "bad_coordinates", f"<{tag}>{text.strip()}</{tag}> is not a finite number"
        values.append(value)
    difficult_text = (obj.findtext("difficult") or "0").strip() or "0"
    try:
        difficult = float(difficult_text)
    except ValueError:
        return "bad_value", f"<difficult>{difficult_text}</difficult> is not 0 or 1"
    if difficult not in (0.0, 1.0):
        return "bad_value", f"<difficult>{difficult_text}</difficult> is not 0 or 1"
    return index[name], values, int(difficult)


def read_voc_objects(xml: str | Path, classes: Sequence[str]) -> list[tuple[int, list[float], int]]:
    """The objects of one VOC file: ``(class index, [xmin, ymin, xmax, ymax] as written, difficult)``.

    For single files outside a dataset folder; raises ``ValueError`` naming the file and the
    object at the first bad one (``read_voc`` collects them instead).
    """
    root = ET.parse(xml).getroot()
    index = {n: i for i, n in enumerate(classes)}
    objects = []
    for k, obj in enumerate(root.findall("object"), 1):
        parsed = _object(obj, index, f"given: {', '.join(classes)}")
        if isinstance(parsed[0], str):
            raise ValueError(f"{xml} object {k}: {parsed[1]}")
        label, box, difficult = parsed
        objects.append((int(label), list(box), int(difficult)))
    return objects


def _number(v: float) -> int | float:
    return int(v) if v.is_integer() else v


def read_voc(root: str | Path, split: str) -> ReadResult:
    """One split (``ImageSets/Main/<split>.txt``) of the Pascal VOC dataset in ``root``, as a COCO dict.

    Dataset-level problems (no Annotations/, no split list, an unreadable class list) raise
    ``ValueError``; problems of single images and objects are in the result's ``problems``.
    """
    root = Path(root)
    list_file, lines = _split_ids(root, split)
    names, classes_from = voc_classes(root)
    index = {n: i for i, n in enumerate(names)}
    category_ids = label_category_ids(len(names))
    coco: dict[str, Any] = {
        "images": [],
        "annotations": [],
        "categories": [{"id": c, "name": n} for c, n in zip(category_ids, names)],
    }
    result = ReadResult(coco)
    problems = result.problems
    images = root / "JPEGImages"
    checked: set[int] = set()
    seen: dict[str, int] = {}
    next_ann = 1
    image_id = 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        stem = line.split()[0]
        if stem in seen:
            problems.append(
                Problem(
                    "duplicate_image_id",
                    f"image id {stem!r} is listed again (first on line {seen[stem]})",
                    location=f"{list_file}:{n}",
                )
            )
            continue
        seen[stem] = n
        image_id += 1
        xml = root / "Annotations" / f"{stem}.xml"
        result.image_locations[image_id] = str(xml)
        try:
            tree = ET.parse(xml).getroot()
        except FileNotFoundError:
            problems.append(
                Problem("bad_label_file", f"{xml} does not exist", None, None, image_id, f"{list_file}:{n}")
            )
            continue
        except (OSError, ET.ParseError, LookupError) as e:  # LookupError: an encoding Python does not know
            problems.append(Problem("bad_label_file", f"not valid XML ({e})", None, None, image_id, str(xml)))
            continue
        except ValueError as e:  # a NUL in the split list's name
            problems.append(
                Problem("bad_label_file", f"cannot open {xml!r} ({e})", None, None, image_id, f"{list_file}:{n}")
            )
            continue
        file_name = _image_file(images, stem, (tree.findtext("filename") or "").strip())
        size = _size(tree)
        if size is None:  # no usable <size>: the file's header says
            try:
                size = image_size(images / file_name)
                checked.add(image_id)
            except ImageReadError as e:
                kind = "missing_image" if not (images / file_name).is_file() else "unreadable_image"
                problems.append(Problem(kind, f"{e} (and the XML has no <size>)", file_name, None, image_id, str(xml)))
        if size is not None:
            coco["images"].append({"id": image_id, "file_name": file_name, "width": size[1], "height": size[0]})
        for k, obj in enumerate(tree.findall("object"), 1):
            ann_id, next_ann = next_ann, next_ann + 1
            where = f"{xml} object {k}"
            result.annotation_locations[ann_id] = where
            parsed = _object(obj, index, classes_from)
            if isinstance(parsed[0], str):
                problems.append(Problem(str(parsed[0]), str(parsed[1]), file_name, ann_id, image_id, where))
                continue
            if size is None:
                continue
            label, (xmin, ymin, xmax, ymax), difficult = parsed
            w, h = xmax - xmin + 1, ymax - ymin + 1
            coco["annotations"].append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": category_ids[label],
                    "bbox": [_number(xmin - 1), _number(ymin - 1), _number(w), _number(h)],
                    "area": _number(w * h),
                    "iscrowd": difficult,
                }
            )
    result.checked_images = frozenset(checked)
    return result
