"""Learning-rate schedule, optimizer parameter groups, data order and checkpoint helpers."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from nasfpn.core.config import TrainConfig
from nasfpn.engine import distributed as D
from nasfpn.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from nasfpn.engine.optim import build_optimizer, group_of, param_groups
from nasfpn.engine.schedule import LRSchedule, scaled_lr


def test_scaled_lr():
    assert scaled_lr(0.08, 64, 64) == 0.08
    assert scaled_lr(0.08, 64, 16) == pytest.approx(0.02)
    with pytest.raises(ValueError):
        scaled_lr(0.08, 0, 16)


def test_warmup_matches_mmengine_linear_lr():
    """LinearLR(start_factor=0.1, end=1000) by iteration: closed form of mmengine's recursion."""
    s = LRSchedule(lr=0.08, iters_per_epoch=100, warmup_iters=1000, warmup_ratio=0.1, milestones=(30, 40))
    assert s(0) == 0.008  # the value MMDetection recorded for iteration 0 (train/losses_*.json lr_used)
    # mmengine: lr_t = lr_{t-1} * (1 + (1 - s) / (T * s + (t - 1) * (1 - s)))
    lr = 0.08 * 0.1
    for t in range(1, 1001):
        lr = lr * (1 + 0.9 / (1000 * 0.1 + (t - 1) * 0.9))
        assert s(t) == pytest.approx(lr, rel=1e-12)
    assert s(1000) == pytest.approx(0.08) and s(2999) == pytest.approx(0.08)


def test_step_decay_by_epoch():
    s = LRSchedule(lr=0.08, iters_per_epoch=10, warmup_iters=5, warmup_ratio=0.1, milestones=(30, 40), gamma=0.1)
    assert s(299) == pytest.approx(0.08)  # last step of epoch 29
    assert s(300) == pytest.approx(0.008)  # epoch 30
    assert s(399) == pytest.approx(0.008)
    assert s(400) == pytest.approx(0.0008)
    assert s(499) == pytest.approx(0.0008)
    # A pure function: asking twice or out of order gives the same value.
    assert [s(i) for i in (450, 3, 450)] == [s(450), s(3), s(450)]
    with pytest.raises(ValueError):
        s(-1)


def test_cosine_decay_by_iteration():
    cfg = TrainConfig(epochs=4, warmup_iters=0, lr_decay="cosine", milestones=(1, 2))
    s = LRSchedule.from_config(cfg, 0.1, iters_per_epoch=25)
    assert s.total_iters == 100
    assert s(0) == pytest.approx(0.1) and s(50) == pytest.approx(0.05) and s(100) == pytest.approx(0.0, abs=1e-12)
    assert s(25) == pytest.approx(0.05 * (1 + 2**-0.5))  # milestones do not apply
    assert all(s(i) > s(i + 1) for i in range(99))
    with pytest.raises(ValueError, match="cosine"):
        LRSchedule(0.1, 10, decay="linear")


def test_no_warmup():
    s = LRSchedule(lr=0.1, iters_per_epoch=3, warmup_iters=0, milestones=())
    assert s(0) == 0.1


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Conv2d(3, 4, 3)
        self.frozen.requires_grad_(False)
        self.conv = nn.Conv2d(4, 4, 3, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.shared = nn.Conv2d(4, 4, 1)
        self.alias = self.shared  # the same module twice (like shared head convs)
        self.fc = nn.Linear(4, 2)


def test_param_groups_norm_no_decay_bias_decay_shared_once_frozen_out():
    net = _Net()
    groups = {g["name"]: g for g in param_groups(net, 1e-4, 0.0)}
    decay = set(groups["decay"]["param_names"])
    no_decay = set(groups["no_decay"]["param_names"])
    assert decay == {"conv.weight", "conv.bias", "shared.weight", "shared.bias", "fc.weight", "fc.bias"}
    assert no_decay == {"bn.weight", "bn.bias", "gn.weight", "gn.bias"}
    assert groups["decay"]["weight_decay"] == 1e-4 and groups["no_decay"]["weight_decay"] == 0.0
    opt = build_optimizer(net, TrainConfig(), lr=0.01)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == 10
    assert group_of(opt, net.frozen.weight) is None
    assert group_of(opt, net.bn.weight)["weight_decay"] == 0.0
    assert group_of(opt, net.conv.bias)["weight_decay"] == 1e-4
    g = group_of(opt, net.fc.weight)
    assert (g["momentum"], g["dampening"], g["nesterov"]) == (0.9, 0, False)


def test_epoch_batches_shard_a_global_batch():
    single = D.epoch_batches(10, 4, seed=3, epoch=2, rank=0, world_size=1)
    r0 = D.epoch_batches(10, 2, seed=3, epoch=2, rank=0, world_size=2)
    r1 = D.epoch_batches(10, 2, seed=3, epoch=2, rank=1, world_size=2)
    assert len(single) == len(r0) == len(r1) == 3 == D.iters_per_epoch(10, 2, 2)
    for s, a, b in zip(single, r0, r1):
        assert s == a + b  # two ranks together see the single process's batch
    flat = [k for b in single for k in b]
    assert {i for i, _ in flat} == set(range(10))  # every image, the last batch topped up
    assert all(e == 2 for _, e in flat)
    # The order depends on (seed, epoch) only.
    assert single == D.epoch_batches(10, 4, seed=3, epoch=2)
    assert single != D.epoch_batches(10, 4, seed=3, epoch=3)
    assert single != D.epoch_batches(10, 4, seed=4, epoch=2)
    # A dataset smaller than one global batch still fills it.
    assert [len(b) for b in D.epoch_batches(3, 8, seed=0, epoch=0)] == [8]


def test_checkpoint_roundtrip_weights_only(tmp_path):
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    state = rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    path = tmp_path / "c.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "config": {"name": "x"}, "rng": state, "step": 3}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["format"] == "nasfpn-train" and loaded["step"] == 3
    ckpt = load_checkpoint(path)
    set_rng_state(ckpt["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError):
        load_checkpoint(tmp_path / "missing.pt")
