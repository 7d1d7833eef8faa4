"""CocoDataset: category mapping, MMDetection's annotation rules, filters, unreadable images."""

from __future__ import annotations

import functools
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from nasfpn.core.config import DataConfig
from nasfpn.data.checks import check_dataset
from nasfpn.data.coco import CocoDataset, coco2017_paths
from nasfpn.data.collate import collate_train
from nasfpn.data.io import ImageReadError
from nasfpn.data.transforms import TrainTransform

CATEGORIES = [{"id": 42, "name": "kite"}, {"id": 3, "name": "car"}, {"id": 7, "name": "truck"}]


def _write(tmp_path, images, annotations, categories=CATEGORIES):
    """Write ``images`` ([(id, file, w, h)]) as solid PNGs and the annotation JSON."""
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    entries = []
    for image_id, name, w, h in images:
        Image.fromarray(np.full((h, w, 3), image_id * 10 % 256, np.uint8)).save(image_dir / name)
        entries.append({"id": image_id, "file_name": name, "width": w, "height": h})
    anns = []
    for i, (image_id, cat, bbox, extra) in enumerate(annotations):
        anns.append(
            {
                "id": 100 + i,
                "image_id": image_id,
                "category_id": cat,
                "bbox": bbox,
                "area": bbox[2] * bbox[3],
                "iscrowd": 0,
                **extra,
            }
        )
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps({"images": entries, "annotations": anns, "categories": categories}))
    return ann_file, image_dir


@pytest.fixture
def dataset_files(tmp_path):
    images = [
        (1, "a.png", 64, 48),
        (2, "b.png", 40, 30),
        (3, "c.png", 50, 50),
        (4, "d.png", 20, 60),
        (5, "e.png", 64, 64),
    ]
    annotations = [
        (1, 42, [10, 5, 20, 10], {}),  # id 100: kept -> label 2
        (1, 3, [0, 0, 5, 6], {}),  # id 101: kept -> label 0
        (1, 7, [30, 20, 10, 10], {"iscrowd": 1}),  # id 102: crowd, left out
        (2, 7, [1, 2, 3, 4], {"iscrowd": 1}),  # id 103: image 2 has only a crowd box
        (3, 3, [10, 10, 0.5, 10], {}),  # id 104: w < 1, dropped
        (3, 3, [10, 10, 10, 10], {"area": 0}),  # id 105: area 0, dropped
        (3, 3, [60, 60, 5, 5], {}),  # id 106: outside the 50x50 image, dropped
        (3, 99, [1, 1, 5, 5], {}),  # id 107: category not in the file, dropped
        (4, 7, [2, 3, 10, 20], {}),  # id 108: kept (image 4 is 20 px wide)
        (5, 3, [60, 60, 10, 10], {}),  # id 109: partly outside: kept as is
    ]
    return _write(tmp_path, images, annotations)


def test_category_mapping_round_trip(dataset_files):
    ds = CocoDataset(*dataset_files)
    assert ds.label_to_category_id == (3, 7, 42)
    assert ds.class_names == ("car", "truck", "kite")
    assert ds.num_classes == 3
    assert all(ds.label_to_category_id[ds.category_id_to_label[c]] == c for c in (3, 7, 42))
    pinned = CocoDataset(*dataset_files, category_ids=[42, 3])
    assert pinned.class_names == ("kite", "car")
    _boxes, labels = pinned.annotations(0)
    assert labels.tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"\[5\]"):
        CocoDataset(*dataset_files, category_ids=[3, 5])


def test_annotation_rules_follow_mmdetection(dataset_files):
    ds = CocoDataset(*dataset_files)
    assert ds.image_ids.tolist() == [1, 2, 3, 4, 5]
    boxes, labels = ds.annotations(0)
    np.testing.assert_array_equal(boxes, np.array([[10, 5, 30, 15], [0, 0, 5, 6]], np.float32))
    assert labels.tolist() == [2, 0]  # crowd box 102 left out
    assert len(ds.annotations(1)[0]) == 0  # only a crowd box
    assert len(ds.annotations(2)[0]) == 0  # w < 1, area 0, outside, unknown category
    np.testing.assert_array_equal(ds.annotations(4)[0], [[60, 60, 70, 70]])


def test_filters(dataset_files):
    ds = CocoDataset(*dataset_files, filter_empty=True)
    assert ds.image_ids.tolist() == [1, 4, 5]
    ds = CocoDataset(*dataset_files, filter_empty=True, min_size=32)
    assert ds.image_ids.tolist() == [1, 5]  # image 4 is 20 px wide


def test_getitem_contract(dataset_files):
    ds = CocoDataset(*dataset_files)
    s = ds[0]
    assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, 48, 64)
    assert s["boxes"].dtype == torch.float32 and s["boxes"].shape == (2, 4)
    assert s["labels"].dtype == torch.int64
    assert (s["image_id"], s["file_name"], s["ori_shape"]) == (1, "a.png", (48, 64))
    assert s["image"][0, 0, 0].item() == 10
    with pytest.raises(IndexError):
        ds[5]


def test_training_randomness_follows_seed_epoch_index(dataset_files):
    ds = CocoDataset(*dataset_files, TrainTransform(size=32), filter_empty=True, seed=5)
    ds.set_epoch(3)
    a = ds[0]
    b = ds[(0, 3)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"])
    again = CocoDataset(*dataset_files, TrainTransform(size=32), filter_empty=True, seed=5)[(0, 3)]
    assert torch.equal(a["boxes"], again["boxes"])
    draws = {tuple(ds[(0, e)]["boxes"].flatten().tolist()) for e in range(8)}
    assert len(draws) > 1


def test_unreadable_image_mid_run_is_resampled(dataset_files, caplog):
    ann_file, image_dir = dataset_files
    cfg = DataConfig()
    ds = CocoDataset(ann_file, image_dir, TrainTransform(size=32), filter_empty=True)
    (image_dir / "d.png").write_bytes(b"broken")  # breaks after the dataset was built
    collate = functools.partial(collate_train, mean=cfg.mean, std=cfg.std, pad_size=32)
    loader = DataLoader(ds, batch_size=3, shuffle=False, collate_fn=collate)
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    assert len(batches) == 1 and batches[0][0].shape == (3, 3, 32, 32)  # the batch kept its size
    ids = [t["image_id"] for t in batches[0][1]]
    assert 4 not in ids and ids[0] == 1 and ids[2] == 5
    assert "d.png" in caplog.text
    # The replacement is deterministic.
    assert ds[1]["image_id"] == ds[1]["image_id"]
    assert torch.equal(ds[1]["image"], ds[1]["image"])


def test_unreadable_image_skip_and_raise_policies(dataset_files):
    ann_file, image_dir = dataset_files
    (image_dir / "b.png").unlink()
    ds = CocoDataset(ann_file, image_dir, on_read_error="skip")
    assert ds[1] is None
    cfg = DataConfig()
    images, targets = collate_train([ds[0], ds[1]], cfg.mean, cfg.std, pad_divisor=32)
    assert images.shape[0] == 1 and targets[0]["image_id"] == 1
    with pytest.raises(ImageReadError, match=r"b\.png"):
        CocoDataset(ann_file, image_dir, on_read_error="raise")[1]


def test_exclude_problems_from_checks(tmp_path):
    ann_file, image_dir = _write(
        tmp_path,
        [(1, "a.png", 64, 48), (2, "b.png", 40, 30), (3, "c.png", 30, 30)],
        [(1, 3, [1, 1, 10, 10], {}), (1, 42, [1, 1, 10, 10], {}), (2, 3, [1, 1, 5, 5], {}), (3, 3, [1, 1, 5, 5], {})],
    )
    data = json.loads(ann_file.read_text())
    data["annotations"][1]["category_id"] = 1000  # unknown category: annotation 101 excluded
    data["images"][1]["width"] = 41  # size mismatch: image 2 excluded
    ann_file.write_text(json.dumps(data))
    (image_dir / "c.png").unlink()  # missing: image 3 excluded
    problems = check_dataset(ann_file, image_dir)
    assert {p.kind for p in problems} == {"unknown_category_id", "size_mismatch", "missing_image"}
    ds = CocoDataset(ann_file, image_dir, exclude=problems)
    assert ds.image_ids.tolist() == [1]
    assert ds.annotations(0)[1].tolist() == [0]


def test_duplicate_image_ids_need_checks(tmp_path):
    ann_file, image_dir = _write(tmp_path, [(1, "a.png", 8, 8), (2, "b.png", 8, 8)], [(1, 3, [1, 1, 5, 5], {})])
    data = json.loads(ann_file.read_text())
    data["images"][1]["id"] = 1
    ann_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="duplicate image ids"):
        CocoDataset(ann_file, image_dir)
    assert len(CocoDataset(ann_file, image_dir, exclude=check_dataset(ann_file, image_dir))) == 0


def test_coco2017_paths(tmp_path):
    assert coco2017_paths(tmp_path, "val") == (
        tmp_path / "annotations" / "instances_val2017.json",
        tmp_path / "val2017",
    )
    with pytest.raises(ValueError):
        coco2017_paths(tmp_path, "test")


def test_bad_json_names_the_file(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json"):
        CocoDataset(tmp_path / "bad.json", tmp_path)
