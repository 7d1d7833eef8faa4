"""check-data: one dataset with every kind of problem, each found with its file / annotation id."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from nasfpn.cli import main
from nasfpn.data.checks import (
    ERROR,
    KINDS,
    WARNING,
    DataCheckError,
    check_dataset,
    format_report,
    has_errors,
    validate_dataset,
)
from nasfpn.data.coco import CocoDataset
from nasfpn.data.problems import READER_KINDS


def _png(path, w, h):
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)


@pytest.fixture
def broken_dataset(tmp_path):
    image_dir = tmp_path / "img"
    image_dir.mkdir()
    _png(image_dir / "ok.png", 40, 30)
    _png(image_dir / "dup1.png", 10, 10)
    _png(image_dir / "dup2.png", 10, 10)
    _png(image_dir / "wrong_size.png", 50, 30)  # JSON says 40 x 30
    (image_dir / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(image_dir / "rotated.jpg", exif=exif)
    images = [
        {"id": 1, "file_name": "ok.png", "width": 40, "height": 30},
        {"id": 2, "file_name": "dup1.png", "width": 10, "height": 10},
        {"id": 2, "file_name": "dup2.png", "width": 10, "height": 10},  # duplicate image id
        {"id": 3, "file_name": "missing.png", "width": 10, "height": 10},  # no such file
        {"id": 4, "file_name": "corrupt.jpg", "width": 10, "height": 10},  # not decodable
        {"id": 5, "file_name": "wrong_size.png", "width": 40, "height": 30},  # size mismatch
        {"id": 6, "file_name": "rotated.jpg", "width": 40, "height": 30},  # EXIF turns it to 30 x 40
        {"id": 7, "width": 10, "height": 10},  # no file_name
        {"id": 8, "file_name": "ok.png", "width": -5, "height": 30},  # bad width
    ]
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 2, "name": "b again"}]

    def ann(ann_id, bbox, image_id=1, cat=1):
        return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": bbox, "area": 1.0, "iscrowd": 0}

    anns = [
        ann(10, [1, 1, 5, 5]),  # fine
        ann(11, [1, 1, 0, 5]),  # zero width
        ann(12, [1, 1, 5, -2]),  # negative height
        ann(13, [35, 25, 10, 10]),  # partly outside the 40 x 30 image
        ann(14, [50, 1, 5, 5]),  # entirely outside
        ann(15, [float("nan"), 1, 5, 5]),  # NaN
        ann(16, [1, float("inf"), 5, 5]),  # inf
        ann(17, [1, "2", 5, 5]),  # non-numeric
        ann(18, [1, 2, 5]),  # 3 values
        ann(19, [1, 1, 5, 5], cat=99),  # unknown category
        ann(20, [1, 1, 5, 5], image_id=999),  # unknown image
        ann(10, [2, 2, 5, 5]),  # duplicate annotation id
        {"id": 21, "image_id": 1, "category_id": 1},  # no bbox
    ]
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return ann_file, image_dir


def _find(problems, kind):
    found = [p for p in problems if p.kind == kind]
    assert found, f"no {kind} problem in:\n{format_report(problems)}"
    return found


def test_every_problem_is_found(broken_dataset):
    problems = check_dataset(*broken_dataset)
    kinds = {p.kind for p in problems}
    assert kinds == set(KINDS) - {"invalid_json"} - READER_KINDS

    assert {p.annotation_id for p in _find(problems, "nonpositive_box")} == {11, 12}
    assert [p.annotation_id for p in _find(problems, "box_partly_outside")] == [13]
    assert [p.annotation_id for p in _find(problems, "box_outside_image")] == [14]
    assert {p.annotation_id for p in _find(problems, "bad_coordinates")} == {15, 16, 17, 18}
    assert [p.annotation_id for p in _find(problems, "unknown_category_id")] == [19]
    (unknown_image,) = _find(problems, "unknown_image_id")
    assert (unknown_image.annotation_id, unknown_image.image_id) == (20, 999)
    assert [p.annotation_id for p in _find(problems, "duplicate_annotation_id")] == [10]
    assert [p.file for p in _find(problems, "duplicate_image_id")] == ["dup2.png"]
    assert len(_find(problems, "duplicate_category_id")) == 1
    assert [p.file for p in _find(problems, "missing_image")] == ["missing.png"]
    assert [p.file for p in _find(problems, "unreadable_image")] == ["corrupt.jpg"]
    mismatches = {p.file: p for p in _find(problems, "size_mismatch")}
    assert set(mismatches) == {"wrong_size.png", "rotated.jpg"}
    assert "EXIF" in mismatches["rotated.jpg"].message
    missing_keys = _find(problems, "missing_key")
    assert {p.annotation_id for p in missing_keys} == {None, 21}
    assert any(p.image_id == 7 for p in missing_keys)
    assert [p.image_id for p in _find(problems, "bad_value")] == [8]
    # Every problem in the annotations names the image file where the image is known.
    assert all(p.file == "ok.png" for p in problems if p.annotation_id in (11, 13, 14, 15, 19))


def test_report_groups_by_kind_with_counts(broken_dataset):
    problems = check_dataset(*broken_dataset)
    report = format_report(problems, max_examples=2)
    n_err = sum(p.severity == ERROR for p in problems)
    n_warn = sum(p.severity == WARNING for p in problems)
    assert report.splitlines()[0] == f"{n_err} error(s), {n_warn} warning(s)"
    assert "error bad_coordinates: 4" in report and "... and 2 more" in report
    assert "warning nonpositive_box: 2" in report
    # Errors come before warnings.
    assert report.index("error size_mismatch") < report.index("warning nonpositive_box")
    assert format_report([]) == "no problems found"


def test_validate_fails_unless_invalid_data_is_skipped(broken_dataset):
    ann_file, image_dir = broken_dataset
    with pytest.raises(DataCheckError, match="size_mismatch") as info:
        validate_dataset(ann_file, image_dir)
    assert has_errors(info.value.problems)
    problems = validate_dataset(ann_file, image_dir, skip_invalid=True)
    ds = CocoDataset(ann_file, image_dir, exclude=problems)
    # Left: ok.png (1) only. Gone: duplicate id 2, missing 3, corrupt 4, mismatching 5 and 6,
    # malformed 7 and 8.
    assert ds.image_ids.tolist() == [1]
    boxes, _labels = ds.annotations(0)
    # Annotation 10 is a duplicate id (excluded), 13 is clipped later, the rest are invalid.
    np.testing.assert_array_equal(boxes, [[35, 25, 45, 35]])
    assert ds[0]["image"].shape == (3, 30, 40)


def test_file_level_problems(tmp_path):
    (tmp_path / "a.json").write_text("{oops")
    (p,) = check_dataset(tmp_path / "a.json", tmp_path)
    assert p.kind == "invalid_json" and p.file == str(tmp_path / "a.json")
    (p,) = check_dataset(tmp_path / "nothing.json", tmp_path)
    assert p.kind == "invalid_json"
    (tmp_path / "b.json").write_text(json.dumps({"images": [], "annotations": []}))
    (p,) = check_dataset(tmp_path / "b.json", tmp_path)
    assert p.kind == "missing_key" and "categories" in p.message
    with pytest.raises(DataCheckError):  # cannot be skipped
        validate_dataset(tmp_path / "b.json", tmp_path, skip_invalid=True)


def test_clean_dataset_and_full_verify(tmp_path):
    _png(tmp_path / "x.png", 20, 10)
    ann_file = tmp_path / "i.json"
    ann_file.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "x.png", "width": 20, "height": 10.0}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 10], "area": 200}],
                "categories": [{"id": 1, "name": "thing"}],
            }
        )
    )
    assert check_dataset(ann_file, tmp_path, verify=True) == []
    # A file whose header is intact but whose pixel data is cut short: only full decoding sees it.
    _png(tmp_path / "big.png", 300, 300)
    data = (tmp_path / "big.png").read_bytes()
    (tmp_path / "x.png").write_bytes(data[: len(data) // 2])
    doc = json.loads(ann_file.read_text())
    doc["images"][0].update(width=300, height=300)
    ann_file.write_text(json.dumps(doc))
    assert check_dataset(ann_file, tmp_path) == []
    assert [p.kind for p in check_dataset(ann_file, tmp_path, verify=True)] == ["unreadable_image"]


def test_check_data_command(broken_dataset, tmp_path, capsys):
    ann_file, image_dir = broken_dataset
    out_json = tmp_path / "problems.json"
    assert main(["check-data", str(ann_file), str(image_dir), "--json", str(out_json)]) == 1
    assert "error size_mismatch: 2" in capsys.readouterr().out
    rows = json.loads(out_json.read_text())
    assert {"kind", "message", "file", "annotation_id", "image_id", "severity"} <= set(rows[0])
    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    assert main(["check-data", str(clean), str(image_dir)]) == 0
