"""Drawing detections."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nasfpn.data.vis import class_colour, draw_detections, one_box_per_object


def test_draws_boxes_in_class_colours_without_touching_input():
    image = np.full((60, 80, 3), 128, dtype=np.uint8)
    before = image.copy()
    boxes = torch.tensor([[10.0, 30.0, 40.0, 55.0], [50.0, 35.0, 75.0, 58.0]])
    out = draw_detections(image, boxes, torch.tensor([0, 3]), torch.tensor([0.9, 0.4]), ["a", "b", "c", "d"])
    assert isinstance(out, Image.Image) and out.size == (80, 60) and out.mode == "RGB"
    assert np.array_equal(image, before)
    pixels = np.asarray(out)
    assert tuple(pixels[45, 10]) == class_colour(0)  # left edge of box 0, below its tag
    assert tuple(pixels[50, 75]) == class_colour(3)  # right edge of box 1
    assert tuple(pixels[5, 5]) == (128, 128, 128)  # far from both boxes


def test_pil_input_and_empty_detections():
    image = Image.new("RGB", (32, 32), (10, 20, 30))
    out = draw_detections(image, np.zeros((0, 4)), np.zeros(0, dtype=np.int64), np.zeros(0), ["a"])
    assert out is not image and np.array_equal(np.asarray(out), np.asarray(image))


def test_colours_are_fixed_and_distinct():
    colours = [class_colour(i) for i in range(12)]
    assert colours == [class_colour(i) for i in range(12)]
    assert len(set(colours)) == 12


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        draw_detections(np.zeros((8, 8, 3), np.uint8), np.zeros((2, 4)), np.zeros(1), None, None)


def test_one_box_per_object_across_classes():
    boxes = np.array([[10, 10, 50, 50], [11, 10, 50, 51], [60, 60, 90, 90], [12, 12, 30, 30]], dtype=np.float64)
    scores = np.array([0.4, 0.9, 0.5, 0.3])
    # Box 0 overlaps the better box 1 (IoU about 0.95): not drawn; box 3 lies inside box 1 but
    # overlaps it by IoU 0.2: drawn. Hand-checked.
    assert one_box_per_object(boxes, scores, 0.7).tolist() == [1, 2, 3]
    image = np.full((100, 100, 3), 128, dtype=np.uint8)
    labels = np.array([0, 3, 1, 2])
    every = np.asarray(draw_detections(image, boxes, labels, scores, None, overlap_iou=None))
    once = np.asarray(draw_detections(image, boxes, labels, scores, None))
    assert tuple(every[30, 10]) == class_colour(0) and tuple(once[30, 10]) != class_colour(0)
