"""Test-time pre-processing against hand-computed values; training augmentation and collation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nasfpn.core.config import DataConfig
from nasfpn.data.collate import collate_train
from nasfpn.data.transforms import (
    EvalTransform,
    TrainTransform,
    collate_eval,
    make_generator,
    normalize_batch,
    preprocess_batch,
    rescale_size,
    resize_image,
)

MEAN = DataConfig().mean
STD = DataConfig().std


def _normalised(value: int, channel: int) -> float:
    """The float32 value MMDetection's (x - mean) / std gives for one pixel value."""
    return float((torch.tensor(float(value)) - torch.tensor(MEAN[channel])) / torch.tensor(STD[channel]))


# --------------------------------------------------------------------------- test time


def test_rescale_size_hand_values():
    assert rescale_size(480, 640, 640) == (480, 640)
    assert rescale_size(500, 1000, 640) == (320, 640)
    assert rescale_size(1000, 500, 640) == (640, 320)
    assert rescale_size(333, 500, 640) == (426, 640)  # factor 1.28: 333 * 1.28 = 426.24
    assert rescale_size(100, 100, (512, 400)) == (400, 400)  # min(512 / 100, 400 / 100)


@pytest.mark.parametrize("divisor", [128, 64])
def test_preprocess_640x480_no_resize_pad_to_512(divisor):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    batch, metas = preprocess_batch([image], 640, divisor, MEAN, STD)
    assert batch.shape == (1, 3, 512, 640) and batch.dtype == torch.float32
    m = metas[0]
    assert (m.ori_shape, m.img_shape, m.scale_factor, m.pad_shape) == ((480, 640), (480, 640), (1.0, 1.0), (512, 640))
    for y, x in [(0, 0), (479, 639), (123, 456)]:
        for c in range(3):
            assert batch[0, c, y, x].item() == _normalised(int(image[y, x, c]), c)
    assert torch.count_nonzero(batch[0, :, 480:, :]) == 0  # padding is exactly 0


def test_preprocess_1000x500_resizes_to_640x320():
    image = np.full((500, 1000, 3), 200, dtype=np.uint8)
    batch, metas = preprocess_batch([image], 640, 128, MEAN, STD)
    m = metas[0]
    assert m.img_shape == (320, 640) and m.scale_factor == (0.64, 0.64) and m.ori_shape == (500, 1000)
    assert batch.shape == (1, 3, 384, 640)
    for c in range(3):
        assert torch.all(batch[0, c, :320] == _normalised(200, c))
    assert torch.count_nonzero(batch[0, :, 320:]) == 0


def test_resize_is_half_pixel_bilinear_rounded_half_up():
    # 1 x 2 -> 1 x 4: source x = (dst + 0.5) / 2 - 0.5 = -0.25 (clamped), 0.25, 0.75, 1.25 (clamped).
    row = torch.tensor([0, 100], dtype=torch.uint8).view(1, 1, 2).expand(3, 1, 2)
    assert resize_image(row, 1, 4)[0, 0].tolist() == [0, 25, 75, 100]
    row = torch.tensor([0, 2], dtype=torch.uint8).view(1, 1, 2).expand(3, 1, 2)
    assert resize_image(row, 1, 4)[0, 0].tolist() == [0, 1, 2, 2]  # 0.5 -> 1, 1.5 -> 2
    same = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    assert resize_image(same, 5, 7) is same


def test_preprocess_batch_mixed_inputs_and_padding():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    as_float = torch.from_numpy(b).permute(2, 0, 1).float() / 255.0
    as_uint8 = torch.from_numpy(b).permute(2, 0, 1)
    ref, ref_metas = preprocess_batch([a, b], 640, 128, MEAN, STD)
    for other in (as_float, as_uint8):
        batch, metas = preprocess_batch([a, other], 640, 128, MEAN, STD)
        torch.testing.assert_close(batch, ref, rtol=0, atol=0)
        assert metas == ref_metas
    # b: factor min(640/400, 640/300) = 1.6 -> 480 x 640, padded inside the 512 x 640 batch.
    assert ref.shape == (2, 3, 512, 640) and ref_metas[1].img_shape == (480, 640)
    assert torch.count_nonzero(ref[1, :, 480:]) == 0


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((10, 10, 3), np.float32), "image 1: numpy images must be uint8"),
        (np.zeros((10, 10), np.uint8), r"image 1: numpy images must be \(H, W, 3\)"),
        (np.zeros((10, 10, 4), np.uint8), r"image 1: numpy images must be \(H, W, 3\)"),
        (torch.zeros(10, 10, 3), r"image 1: tensors must be \(3, H, W\)"),
        (torch.full((3, 10, 10), 2.0), r"image 1: float tensors must hold values in \[0, 1\]"),
        (torch.zeros((3, 10, 10), dtype=torch.int32), "image 1: tensor dtype"),
        ([[1, 2, 3]], "image 1: expected a numpy array"),
    ],
)
def test_preprocess_rejects_bad_inputs(bad, match):
    good = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ValueError, match=match):
        preprocess_batch([good, bad], 640, 128, MEAN, STD)


def test_eval_collate_equals_preprocess_batch():
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(500, 1000), (480, 640), (200, 150)]]
    transform = EvalTransform(640)
    samples = []
    for i, im in enumerate(images):
        chw = torch.from_numpy(im).permute(2, 0, 1).contiguous()
        samples.append(transform({"image": chw, "image_id": i, "file_name": f"{i}.jpg", "ori_shape": im.shape[:2]}))
    batch, metas, infos = collate_eval([*samples, None], MEAN, STD, 128)
    ref, ref_metas = preprocess_batch(images, 640, 128, MEAN, STD)
    torch.testing.assert_close(batch, ref, rtol=0, atol=0)
    assert metas == ref_metas
    assert [i["image_id"] for i in infos] == [0, 1, 2]


# --------------------------------------------------------------------------- training


def _rectangle_sample(h: int, w: int, box: tuple[int, int, int, int]) -> dict:
    image = torch.zeros((3, h, w), dtype=torch.uint8)
    x1, y1, x2, y2 = box
    image[:, y1:y2, x1:x2] = 255
    return {
        "image": image,
        "boxes": torch.tensor([box], dtype=torch.float32),
        "labels": torch.tensor([3]),
        "image_id": 1,
        "file_name": "r.jpg",
    }


def test_train_boxes_follow_the_pixels():
    """After resize, crop and flip, the box still encloses exactly the rectangle's pixels."""
    transform = TrainTransform(size=160, scale_range=(0.8, 1.2))
    sample = _rectangle_sample(150, 250, (60, 40, 200, 110))
    flips = set()
    for index in range(40):
        out = transform(sample, make_generator(0, 0, index))
        image, boxes = out["image"], out["boxes"]
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        assert image.shape[1] <= 160 and image.shape[2] <= 160
        assert out["img_shape"] == tuple(image.shape[1:])
        assert boxes.shape == (1, 4) and out["labels"].tolist() == [3]
        ys, xs = torch.nonzero(image[0] > 127, as_tuple=True)
        bright = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        # Bilinear edges blur by under a pixel; clipped box sides coincide with the crop border.
        torch.testing.assert_close(boxes[0], bright, atol=1.0, rtol=0)
        flips.add(out["flip"])
    assert flips == {True, False}


def test_train_crop_is_redrawn_until_a_box_survives():
    # The box sits in the last 1.4% of a wide image: at scale 1.2 (384 x 192) a 320 crop keeps it
    # only if its left offset is above 58 of the possible 0..64.
    sample = _rectangle_sample(250, 500, (493, 100, 500, 130))
    first_draw_missed = 0
    for tries in (10, 1):  # 1: every miss goes straight to the fallback crop around a box
        transform = TrainTransform(size=320, scale_range=(1.2, 1.2), flip_prob=0.0, max_crop_tries=tries)
        for index in range(30):
            out = transform(sample, make_generator(3, 0, index))
            assert out["image"].shape == (3, 192, 320)
            assert len(out["boxes"]) == 1 and out["crop_offset"][1] > 58
            # Replay the first draw (ratio, top, left) of the same generator.
            g = make_generator(3, 0, index)
            torch.rand((), generator=g, dtype=torch.float64)
            torch.randint(0, 1, (), generator=g)
            first_draw_missed += int(torch.randint(0, 65, (), generator=g)) <= 58
    assert first_draw_missed > 30  # most first crops lost the box and were drawn again


def test_train_box_dropped_when_outside_crop_but_others_kept():
    sample = _rectangle_sample(250, 500, (10, 10, 150, 150))
    sample["boxes"] = torch.tensor([[10.0, 10, 150, 150], [493, 100, 500, 130]])
    sample["labels"] = torch.tensor([1, 2])
    transform = TrainTransform(size=320, scale_range=(1.2, 1.2), flip_prob=0.0)
    kept = [transform(sample, make_generator(0, 0, i))["labels"].tolist() for i in range(20)]
    assert [1] in kept and [1, 2] in kept  # the edge box is cut away by some crops, not all


def test_train_transform_is_deterministic():
    rng = np.random.default_rng(4)
    image = torch.from_numpy(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)).permute(2, 0, 1).contiguous()
    sample = {
        "image": image,
        "boxes": torch.tensor([[10.0, 20, 200, 220], [300, 50, 480, 290]]),
        "labels": torch.tensor([0, 1]),
        "image_id": 7,
        "file_name": "x.jpg",
    }
    transform = TrainTransform(size=256)
    a = transform(sample, make_generator(11, 2, 5))
    b = transform(sample, make_generator(11, 2, 5))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"])
    others = [transform(sample, make_generator(11, epoch, 5)) for epoch in range(3, 8)]
    assert any(o["image"].shape != a["image"].shape or not torch.equal(o["image"], a["image"]) for o in others)


def test_image_without_boxes_is_fine():
    sample = {
        "image": torch.zeros((3, 100, 80), dtype=torch.uint8),
        "boxes": torch.zeros((0, 4)),
        "labels": torch.zeros((0,), dtype=torch.int64),
        "image_id": 0,
        "file_name": "e.jpg",
    }
    out = TrainTransform(size=64)(sample, make_generator(0, 0, 0))
    assert out["boxes"].shape == (0, 4) and out["labels"].dtype == torch.int64


def test_collate_train_pads_and_normalises():
    transform = TrainTransform(size=128)
    samples = []
    for i, (h, w) in enumerate([(100, 300), (200, 120), (90, 90)]):
        s = _rectangle_sample(h, w, (10, 10, 60, 60))
        s["image_id"] = i
        samples.append(transform(s, make_generator(0, 0, i)))
    images, targets = collate_train([*samples, None], MEAN, STD, pad_size=128)
    assert images.shape == (3, 3, 128, 128) and images.dtype == torch.float32
    for img, t in zip(images, targets):
        h, w = t["img_shape"]
        assert t["pad_shape"] == (128, 128)
        assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
        assert torch.count_nonzero(img[:, h:, :]) == 0 and torch.count_nonzero(img[:, :, w:]) == 0
    # Normalising later (on the device) gives the same batch.
    raw, raw_targets = collate_train(samples, MEAN, STD, pad_size=128, normalize=False)
    assert raw.dtype == torch.uint8
    torch.testing.assert_close(
        normalize_batch(raw, MEAN, STD, [t["img_shape"] for t in raw_targets]), images, rtol=0, atol=0
    )
    # Without a fixed size: the largest image rounded up to the divisor; pad_shape per image.
    images, targets = collate_train(samples, MEAN, STD, pad_size=None, pad_divisor=32)
    max_h = max(t["img_shape"][0] for t in targets)
    assert images.shape[2] == -(-max_h // 32) * 32
    assert all(t["pad_shape"][0] % 32 == 0 and t["pad_shape"][0] >= t["img_shape"][0] for t in targets)


def test_fast_training_resize_stays_within_one_grey_level():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 48, 64), generator=g, dtype=torch.uint8)
    for h, w in ((55, 73), (32, 43), (48, 64)):
        exact, fast = resize_image(image, h, w), resize_image(image, h, w, fast=True)
        assert fast.shape == exact.shape == (3, h, w) and fast.dtype == torch.uint8
        assert (fast.int() - exact.int()).abs().max() <= 1


def test_rescale_size_never_gives_an_empty_side():
    """A sliver image would round to 0 px (where mmcv's resize fails): each side keeps at least 1."""
    from nasfpn.data.transforms import rescale_size

    assert rescale_size(1, 2000, 640) == (1, 640)
    assert rescale_size(3000, 2, (640, 640)) == (640, 1)
    assert rescale_size(480, 640, 640) == (480, 640)
