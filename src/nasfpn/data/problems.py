"""What is wrong with a dataset (``Problem``, its ``KINDS``), and what a dataset reader returns
(``ReadResult``: the COCO dict every part of the package uses, the problems met while reading,
and which label file, line or XML object each image and annotation came from).

``data.checks`` reports problems for every format; the YOLO and Pascal VOC readers
(``data.yolo``, ``data.voc``) report those only they can see (a label line with 4 fields, a
class index out of range) with the same ``Problem`` type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ERROR = "error"
WARNING = "warning"

# kind -> (severity, what it means)
KINDS: dict[str, tuple[str, str]] = {
    "invalid_json": (ERROR, "annotation file missing, unreadable or not a COCO JSON object"),
    "invalid_dataset": (ERROR, "dataset description (data.yaml, folder layout, split list) missing or malformed"),
    "missing_key": (ERROR, "a required key (JSON) or element (XML) is missing"),
    "bad_value": (ERROR, "a value has the wrong type or range"),
    "bad_label_file": (ERROR, "a label file (YOLO .txt, VOC .xml) is missing, unreadable or not valid"),
    "bad_label_line": (ERROR, "a YOLO label line does not have the 5 fields 'class cx cy w h'"),
    "duplicate_image_id": (ERROR, "several images share an id (or a split list names an image twice)"),
    "duplicate_annotation_id": (ERROR, "several annotations share an id"),
    "duplicate_category_id": (ERROR, "several categories share an id"),
    "unknown_image_id": (ERROR, "annotation points at an image id that is not in 'images'"),
    "unknown_category_id": (ERROR, "an object's category or class is not one of the dataset's classes"),
    "bad_coordinates": (ERROR, "box coordinates are not 4 finite numbers"),
    "not_normalized": (ERROR, "a YOLO box value lies outside 0..1 (pixels instead of fractions of the image size?)"),
    "box_outside_image": (ERROR, "box lies entirely outside its image"),
    "missing_image": (ERROR, "image file not found"),
    "unreadable_image": (ERROR, "image file cannot be decoded"),
    "size_mismatch": (ERROR, "image size in the annotations differs from the file"),
    "nonpositive_box": (WARNING, "box width or height <= 0 (dropped in training)"),
    "box_partly_outside": (WARNING, "box crosses the image border (clipped in training)"),
    "unmatched_label": (WARNING, "a YOLO label file has no image (not used)"),
}
# Kinds only the YOLO / VOC readers report (a COCO file cannot have them).
READER_KINDS = frozenset({"invalid_dataset", "bad_label_file", "bad_label_line", "not_normalized", "unmatched_label"})


@dataclass(frozen=True)
class Problem:
    kind: str
    """One of ``KINDS``."""
    message: str
    file: str | None = None
    """Image file name as in the COCO dict (or the annotation file for file-level problems)."""
    annotation_id: int | None = None
    image_id: int | None = None
    location: str | None = None
    """Where in a YOLO / VOC dataset's own files: ``labels/train/a.txt:3`` (label file and line),
    ``Annotations/a.xml object 2`` (XML file and 1-based object index), a split list's line."""

    @property
    def severity(self) -> str:
        return KINDS[self.kind][0]

    def __str__(self) -> str:
        where = [f"file {self.file}"] if self.file is not None else []
        if self.image_id is not None:
            where.append(f"image id {self.image_id}")
        if self.annotation_id is not None:
            where.append(f"annotation id {self.annotation_id}")
        head = f"[{self.kind}] " + (f"{self.location}: " if self.location else "")
        return head + self.message + (f" ({', '.join(where)})" if where else "")


@dataclass
class ReadResult:
    """A dataset split read into a COCO dict, with what the reader found wrong on the way.

    Entries the reader could not turn into COCO (a malformed line, an unknown class) are left
    out of ``coco`` and described in ``problems``; their annotation ids are reserved, so a problem
    still names one annotation (and skipping invalid data leaves out that object, not its image).
    """

    coco: dict[str, Any]
    problems: list[Problem] = field(default_factory=list)
    annotation_locations: dict[int, str] = field(default_factory=dict)
    image_locations: dict[int, str] = field(default_factory=dict)
    checked_images: frozenset[int] = frozenset()
    """Image ids whose file the reader already opened (it exists, its header reads, the size is the file's)."""

    def locate(self, problem: Problem) -> Problem:
        """``problem`` with its ``location`` filled in from the annotation or image it names."""
        if problem.location is not None:
            return problem
        where = self.annotation_locations.get(problem.annotation_id) if problem.annotation_id is not None else None
        if where is None and problem.image_id is not None:
            where = self.image_locations.get(problem.image_id)
        if where is None:
            return problem
        return Problem(problem.kind, problem.message, problem.file, problem.annotation_id, problem.image_id, where)
