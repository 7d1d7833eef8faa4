"""The embedded synthetic dataset: determinism, COCO layout, exact boxes, occlusion, statistics."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
from PIL import Image

from nasfpn.data.synthetic import (
    SHAPE_CATEGORY_IDS,
    SHAPE_NAMES,
    SyntheticSpec,
    _render,
    _sample_shape,
    dataset_stats,
    generate_dataset,
    render_image,
)


def _tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = generate_dataset(tmp_path / "a", 5, 3, image_size=96, seed=7)
    b = generate_dataset(tmp_path / "b", 5, 3, image_size=96, seed=7, workers=2)  # order-independent
    c = generate_dataset(tmp_path / "c", 5, 3, image_size=96, seed=8)
    tree_a, tree_b, tree_c = _tree(a.root), _tree(b.root), _tree(c.root)
    assert len(tree_a) == 5 + 3 + 3  # images, two annotation files, manifest
    assert tree_a == tree_b
    assert tree_a.keys() == tree_c.keys()
    assert tree_a["train/000001.png"] != tree_c["train/000001.png"]
    assert tree_a["annotations/instances_train.json"] != tree_c["annotations/instances_train.json"]


PINNED_DIGEST = "e3ee2065ddf12df590ae085a2cd0aa86a9ccb145082d03f3657c8a4557c37f82"


def test_pixels_and_objects_are_pinned():
    # Any change to what the generator draws (or a platform giving other pixels) shows up here;
    # bump GENERATOR_VERSION and update the digest when the change is intended.
    spec = SyntheticSpec(image_size=(64, 80))
    digest = hashlib.sha256()
    for index in range(3):
        pixels, objects = render_image(spec, 0, "train", index)
        digest.update(pixels.tobytes())
        digest.update(json.dumps(objects, sort_keys=True).encode())
    assert digest.hexdigest() == PINNED_DIGEST


def test_coco_layout(tmp_path):
    ds = generate_dataset(tmp_path, 8, 4, image_size=(96, 128), seed=3, num_classes=6, max_objects=4)
    assert ds.class_names == SHAPE_NAMES[:6]
    assert ds.category_ids == SHAPE_CATEGORY_IDS[:6] == (1, 2, 4, 5, 7, 8)
    splits = (
        (ds.train_annotations, ds.train_images, range(1, 9)),
        (ds.val_annotations, ds.val_images, range(1_000_001, 1_000_005)),
    )
    for ann_path, image_dir, ids in splits:
        data = json.loads(ann_path.read_text())
        assert [c["id"] for c in data["categories"]] == list(ds.category_ids)
        assert [c["name"] for c in data["categories"]] == list(ds.class_names)
        assert [img["id"] for img in data["images"]] == list(ids)  # disjoint across splits
        for img in data["images"]:
            assert (img["width"], img["height"]) == (128, 96)
            with Image.open(image_dir / img["file_name"]) as im:
                assert im.size == (128, 96) and im.mode == "RGB"
        anns = data["annotations"]
        assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))
        per_image = {img["id"]: 0 for img in data["images"]}
        for a in anns:
            per_image[a["image_id"]] += 1
            x, y, w, h = a["bbox"]
            assert x >= 0 and y >= 0 and x + w <= 128 and y + h <= 96 and w >= 1 and h >= 1
            assert a["area"] == w * h and a["iscrowd"] == 0
            assert a["category_id"] in ds.category_ids
            assert 0.4 <= a["visible"] <= 1.0
        assert all(1 <= k <= 4 for k in per_image.values())


@pytest.mark.parametrize("kind", SHAPE_NAMES)
def test_shape_masks_are_tight_and_sized(kind):
    spec = SyntheticSpec()
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = _sample_shape(rng, kind, spec)
        # Tight: the first and last row and column each hold shape pixels.
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
        assert 8 <= math.sqrt(mask.shape[0] * mask.shape[1]) <= 0.5 * 256 * 1.5
        assert mask.sum() >= 0.15 * mask.size  # a real shape, not a sliver


def test_boxes_are_exact_and_occlusion_is_capped():
    spec = SyntheticSpec(image_size=(128, 128), max_objects=8)
    checked_occluded = 0
    for index in range(25):
        pixels, owner, objects = _render(spec, np.random.default_rng([11, 0, index]))
        assert 1 <= len(objects) <= 8
        assert pixels.dtype == np.uint8 and pixels.shape == (128, 128, 3)
        for i, obj in enumerate(objects):
            x, y, w, h = obj["bbox"]
            ys, xs = np.nonzero(owner == i)
            assert xs.size > 0
            # Every visible pixel lies inside the box ...
            assert xs.min() >= x and xs.max() < x + w and ys.min() >= y and ys.max() < y + h
            # ... and an unoccluded object fills its box to all four edges (tight).
            if obj["visible"] == 1.0:
                assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (x, x + w, y, y + h)
            else:
                checked_occluded += 1
            assert obj["visible"] >= 1.0 - spec.max_occlusion
    assert checked_occluded >= 3  # the case exercises occlusion


def test_dataset_statistics_are_learnable_and_varied():
    spec = SyntheticSpec()
    anns, images = [], []
    for index in range(80):
        _, objects = render_image(spec, 0, "train", index)
        images.append({"id": index + 1})
        for obj in objects:
            anns.append(
                {
                    "image_id": index + 1,
                    "category_id": SHAPE_CATEGORY_IDS[obj["label"]],
                    "bbox": obj["bbox"],
                    "area": obj["area"],
                    "visible": obj["visible"],
                }
            )
    categories = [{"id": i, "name": n} for i, n in zip(SHAPE_CATEGORY_IDS, SHAPE_NAMES)]
    stats = dataset_stats({"images": images, "annotations": anns, "categories": categories})
    per_image = stats["objects_per_image"]
    assert per_image["min"] >= 1 and per_image["max"] <= spec.max_objects
    assert 2.5 <= per_image["mean"] <= 4.5
    sides = stats["box_side_px"]
    assert sides["min"] >= 8 and sides["p10"] >= 14  # few tiny objects
    assert 28 <= sides["median"] <= 60 and sides["max"] >= 90  # mostly medium, some large
    counts = list(stats["per_class"].values())
    assert min(counts) >= 0.5 * max(counts)  # balanced classes
    assert 0.05 <= stats["occluded_fraction"] <= 0.4


def test_second_call_reuses_and_changed_call_regenerates(tmp_path):
    ds = generate_dataset(tmp_path, 4, 2, image_size=64)
    first = ds.train_images / "000004.png"
    stamp = first.stat().st_mtime_ns
    assert generate_dataset(tmp_path, 4, 2, image_size=64) == ds
    assert first.stat().st_mtime_ns == stamp  # nothing rewritten
    generate_dataset(tmp_path, 2, 2, image_size=64)
    assert sorted(p.name for p in ds.train_images.iterdir()) == ["000001.png", "000002.png"]
    assert len(json.loads(ds.train_annotations.read_text())["images"]) == 2


def test_invalid_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticSpec(num_classes=9)
    with pytest.raises(ValueError, match="image_size"):
        SyntheticSpec(image_size=(16, 64))
    with pytest.raises(ValueError, match="split"):
        render_image(SyntheticSpec(), 0, "test", 0)
