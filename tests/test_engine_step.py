"""The one training step (``engine.step.train_step``): gradient clipping, skipping a non-finite
step, the stop flag; and that the trainer, ``bench --mode train`` and the demo's timing run it."""

from __future__ import annotations

import pytest
import torch

from engine_utils import SIZE, synthetic_data, tiny_config
from nasfpn.apps import bench, demo
from nasfpn.engine import step as S
from nasfpn.engine import trainer
from nasfpn.models import RetinaNet, build_model


def _parts(**train):
    cfg = tiny_config(**train)
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained_backbone=False).train()
    return model, S.build_step_parts(model, cfg.train, 0.01)


def _batch():
    torch.manual_seed(1)
    return torch.randn(2, 3, SIZE, SIZE), bench.synthetic_targets(2, SIZE, num_classes=8)


def _nan_loss(self, outputs, targets):
    out = _original_loss(self, outputs, targets)
    return dict(out, loss=out["loss"] * float("nan"))


_original_loss = RetinaNet.loss


def test_step_updates_and_clips_gradients():
    model, parts = _parts(grad_clip=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    result = S.train_step(parts, _batch(), lr=0.01)
    assert result.applied and not result.stop and result.lr == 0.01
    assert result.grad_norm > 1e-2  # the norm before clipping
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.nn.utils.get_total_norm(grads) <= 1e-3 * 1.001  # what the optimizer saw
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert result.losses().keys() == {"loss", "loss_cls", "loss_bbox"} and result.num_pos > 0


def test_nonfinite_step_changes_nothing(monkeypatch):
    model, parts = _parts()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(RetinaNet, "loss", _nan_loss)
    result = S.train_step(parts, _batch(), lr=0.01)
    assert not result.applied and result.loss != result.loss  # nan
    # No update, BN running statistics (changed by the forward pass) put back, gradients dropped.
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_stop_travels_with_the_step():
    _, parts = _parts()
    assert S.train_step(parts, _batch(), lr=0.01, stop=lambda: True).stop


def test_trainer_bench_and_demo_run_the_same_step(monkeypatch, tmp_path):
    assert trainer.train_step is S.train_step and trainer.TrainStep is S.TrainStep
    calls = []
    original = S.train_step

    def spy(parts, batch, lr, stop=None):
        calls.append(parts.settings)
        return original(parts, batch, lr, stop)

    monkeypatch.setattr(S, "train_step", spy)
    cfg = tiny_config(grad_clip=5.0)
    r = bench.bench_train(cfg, batch=2, size=SIZE, warmup=1, iters=2, memory=False)
    assert len(calls) == 4 and r["grad_clip"] == 5.0 and calls[0].grad_clip == 5.0  # 1 warm-up + 2 timed + 1

    data = synthetic_data(tmp_path, num_train=4, num_val=1)
    calls.clear()
    demo._step_seconds(cfg, torch.device("cpu"), demo._timing_dataset(cfg, data), steps=2)
    assert len(calls) == 2 and calls[0].grad_clip == 5.0


def test_bench_train_shows_skipped_steps(monkeypatch):
    monkeypatch.setattr(RetinaNet, "loss", _nan_loss)
    r = bench.bench_train(tiny_config(), batch=2, size=SIZE, warmup=1, iters=2, memory=False)
    assert r["skipped_steps"] == 2 and r["loss"] != r["loss"]
    assert "2 of 2 timed steps were skipped" in bench.format_result(r)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_bench_train_precisions_use_the_trainer_amp(precision):
    r = bench.bench_train(tiny_config(), batch=2, size=SIZE, warmup=1, iters=1, precision=precision, memory=False)
    assert r["precision"] == precision and r["skipped_steps"] == 0 and r["loss"] == r["loss"]
