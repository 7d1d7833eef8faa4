"""The one unreadable-image policy of training: the dataset gives None, the training collate
(``data.collate``) drops and counts those samples, a batch without a readable image is None and
the training loop skips its step."""

from __future__ import annotations

import logging

import torch

from engine_utils import read_log, synthetic_data, tiny_config
from nasfpn.core.config import DataConfig
from nasfpn.data.coco import CocoDataset
from nasfpn.data.collate import collate_train, train_collate
from nasfpn.data.transforms import TrainTransform
from nasfpn.engine.trainer import train


def _sample(image_id: int, h: int = 20, w: int = 30) -> dict:
    return {
        "image": torch.full((3, h, w), 100, dtype=torch.uint8),
        "boxes": torch.tensor([[1.0, 2.0, 10.0, 12.0]]),
        "labels": torch.tensor([1]),
        "image_id": image_id,
    }


def test_collate_drops_and_counts_unreadable_samples(caplog):
    collate = train_collate(DataConfig(image_size=32, pad_divisor=32))
    with caplog.at_level(logging.WARNING, logger="nasfpn.data.collate"):
        images, targets = collate([_sample(1), None, _sample(2), None])
    assert images.shape == (2, 3, 32, 32) and [t["image_id"] for t in targets] == [1, 2]
    assert "dropped 2 unreadable image(s) from a training batch of 4" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nasfpn.data.collate"):
        assert collate([None, None]) is None  # nothing readable: the loop skips the step
    assert "dropped 2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nasfpn.data.collate"):
        collate([_sample(3)])
    assert caplog.text == ""  # full batches say nothing


def test_dataset_gives_none_when_resampling_finds_nothing(tmp_path, caplog):
    data = synthetic_data(tmp_path / "data", num_train=4, num_val=1)
    ds = CocoDataset(data.train_ann, data.train_images, TrainTransform(64), filter_empty=True, max_read_retries=3)
    for path in (tmp_path / "data" / "train").iterdir():
        path.write_bytes(b"broken")
    with caplog.at_level(logging.WARNING):
        assert ds[0] is None
    assert "4 images in a row were unreadable" in caplog.text
    assert collate_train([ds[1], ds[2]], (0, 0, 0), (1, 1, 1)) is None


def test_batches_without_readable_images_are_skipped_by_the_trainer(tmp_path, capsys):
    data = synthetic_data(tmp_path / "data", num_train=8, num_val=2)
    for path in (tmp_path / "data" / "train").iterdir():
        path.write_bytes(path.read_bytes()[:120])  # the header survives (data check passes), decoding fails
    result = train(tiny_config(epochs=1), data, tmp_path / "run", progress=False)
    assert result.status == "completed" and result.steps == 2 and result.skipped_steps == 0
    out = capsys.readouterr().out
    assert "step 0: no readable image in this batch; skipped" in out and "step 1: no readable" in out
    log = tmp_path / "run" / "log.jsonl"
    assert (read_log(tmp_path / "run") if log.exists() else []) == []  # no step record
    assert result.history[0]["loss"] is None
    # Such a step counts like any other: max_steps stops after it.
    result = train(tiny_config(epochs=1), data, tmp_path / "run2", progress=False, quiet=True, max_steps=1)
    assert result.status == "max_steps" and result.steps == 1
