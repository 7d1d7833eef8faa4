"""benchmarks/trees_dataset.py: tile origins, boxes cut by tiles, and the three splits from VOC files."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def td():
    return load_benchmark("trees_dataset")


def test_tile_origins_cover_the_range_and_end_flush(td):
    assert td.tile_origins(300, 128, 64) == [0, 64, 128, 172]
    assert td.tile_origins(256, 128, 128) == [0, 128]
    assert td.tile_origins(100, 128, 64) == []
    assert td.tile_origins(500, 128, 128, 300, 500) == [300, 372]


def test_boxes_in_tile_keeps_mostly_visible_boxes_clipped(td):
    boxes = np.array([[10, 10, 30, 30], [120, 0, 140, 20], [125, 50, 160, 70], [200, 200, 220, 220]], float)
    inside = td.boxes_in_tile(boxes, 0, 0, 128, 0.6)
    # the first whole; the second 8/20 visible (dropped); the third 3/35 (dropped); the fourth outside
    np.testing.assert_array_equal(inside, [[10, 10, 30, 30]])
    inside = td.boxes_in_tile(boxes, 0, 0, 128, 0.3)
    np.testing.assert_array_equal(inside, [[10, 10, 30, 30], [120, 0, 128, 20]])
    np.testing.assert_array_equal(td.boxes_in_tile(boxes, 100, 0, 128, 0.6), [[20, 0, 40, 20], [25, 50, 60, 70]])


def _voc(path: Path, boxes) -> None:
    objects = "".join(
        f"<object><name>Tree</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax>"
        "</bndbox></object>"
        for a, b, c, d in boxes
    )
    path.write_text(f"<annotation>{objects}</annotation>")


def _crops(td, src: Path, train_height: int, train_boxes) -> Path:
    """The two crops as the wheel ships them: a ``train_height`` x 256 one and a 128 x 256 one."""
    src.mkdir()
    rng = np.random.default_rng(train_height)
    Image.fromarray(rng.integers(0, 255, (train_height, 256, 3), dtype=np.uint8)).save(src / f"{td.TRAIN_CROP}.png")
    _voc(src / f"{td.TRAIN_CROP}.xml", train_boxes)
    Image.fromarray(rng.integers(0, 255, (128, 256, 3), dtype=np.uint8)).save(src / f"{td.VAL_CROP}.png")
    _voc(src / f"{td.VAL_CROP}.xml", [(5, 5, 25, 25)])
    return src


def test_build_writes_disjoint_train_heldout_and_val_splits(td, tmp_path):
    src = _crops(td, tmp_path / "data", 320, [(10, 10, 40, 40), (150, 20, 190, 60), (60, 270, 90, 300)])
    counts = td.build(tmp_path / "out", src, tile=128, stride=64, heldout_frac=0.2)
    # 320 px high, cut at 256: training tiles in rows 0..255, held-out tiles in the band 256..319 (none: < 128)
    assert counts["heldout"] == {"images": 0, "boxes": 0}
    coco = json.loads((tmp_path / "out" / "annotations" / "instances_train.json").read_text())
    assert all(img["width"] == img["height"] == 128 for img in coco["images"])
    assert {a["category_id"] for a in coco["annotations"]} == {1}
    assert counts["train"]["boxes"] == len(coco["annotations"]) > 0
    assert counts["val"] == {"images": 2, "boxes": 1}  # empty tiles are kept outside training
    for img in coco["images"]:
        assert (tmp_path / "out" / "train" / img["file_name"]).is_file()
    with pytest.raises(ValueError, match="empty extent"):
        _voc(src / "bad.xml", [(10, 10, 5, 40)])
        td.read_voc_boxes(src / "bad.xml")


def test_a_validation_band_of_the_training_crop_and_overlapping_evaluation_tiles(td, tmp_path):
    # 640 px high: training rows 0..383, held-out band 384..511, validation band 512..639
    src = _crops(td, tmp_path / "data", 640, [(10, 10, 40, 40), (100, 420, 130, 450), (150, 560, 180, 590)])
    counts = td.build(tmp_path / "out", src, tile=128, stride=64, heldout_frac=0.2, val_frac=0.2, eval_stride=64)
    ann = tmp_path / "out" / "annotations"
    val = json.loads((ann / "instances_val.json").read_text())
    assert all(img["file_name"].startswith("yell528_") for img in val["images"])  # the training crop's band
    assert {int(img["file_name"].split("_y")[1][:4]) for img in val["images"]} == {512}
    # one row of tiles every 64 px across 256 px: x = 0, 64, 128; the tree at x 150..180 is in two
    assert counts["val"] == {"images": 3, "boxes": 2}
    assert counts["heldout"]["images"] == 3 and counts["other"] == {"images": 3, "boxes": 1}
    train = json.loads((ann / "instances_train.json").read_text())
    assert max(int(img["file_name"].split("_y")[1][:4]) for img in train["images"]) + 128 <= 384
    with pytest.raises(SystemExit, match="training band"):
        td.build(tmp_path / "bad", src, heldout_frac=0.5, val_frac=0.5)
