"""A run fitted to a time budget: the plan's arithmetic, the compressed schedule, one run end to end."""

from __future__ import annotations

import math

import pytest
import torch

from engine_utils import synthetic_data, tiny_config
from nasfpn.engine import trainer as T
from nasfpn.engine.budget import TimeBudget
from nasfpn.engine.schedule import LRSchedule
from nasfpn.engine.trainer import train


def test_plan_fits_steps_and_evaluations_into_the_time_left() -> None:
    b = TimeBudget(seconds=100.0, full_iters=1000, iters_per_epoch=10, eval_interval=100, margin=0.0)
    b.eval_seconds = 10.0
    # 100 s, 0 used, 1 s per step, one (final) evaluation of 10 s: 90 steps.
    assert b.plan(0, 0.0, 1.0) == 90
    # Half used at step 40: 40 + (50 - 10) / 1.
    assert b.plan(40, 50.0, 1.0) == 80
    # Never beyond the configured schedule, never before the next step.
    assert b.plan(0, 0.0, 0.001) == 1000
    assert b.plan(40, 99.0, 1.0) == 41


def test_plan_pays_for_the_intermediate_evaluations() -> None:
    b = TimeBudget(seconds=100.0, full_iters=1000, iters_per_epoch=10, eval_interval=1, margin=0.0)
    b.eval_seconds = 5.0
    total = b.plan(0, 0.0, 1.0)
    # Every 10 steps an evaluation: total steps + 5 s per evaluation (the final one included) fit in 100 s.
    evals = b.evaluations_left(0, total)
    assert total + evals * 5.0 <= 100.0
    assert (total + 1) + b.evaluations_left(0, total + 1) * 5.0 > 100.0 - 5.0
    assert b.evaluations_left(0, 25) == 3  # after steps 10 and 20, and the final one


def test_fitted_schedule_moves_the_milestones_and_the_cosine_end() -> None:
    s = LRSchedule(lr=1.0, iters_per_epoch=10, warmup_iters=0, milestones=(8,), gamma=0.1, total_iters=100)
    assert s(79) == 1.0 and s(80) == pytest.approx(0.1)
    half = s.fit(50)  # the same schedule in half the steps: the milestone at 40
    assert half(39) == 1.0 and half(40) == pytest.approx(0.1)
    assert s.fit(100)(80) == s(80)  # fitted to its own length: unchanged
    cos = LRSchedule(lr=1.0, iters_per_epoch=10, warmup_iters=0, decay="cosine", total_iters=100).fit(40)
    assert cos(20) == pytest.approx(0.5) and cos(40) == pytest.approx(0.0, abs=1e-12)


def test_run_fits_its_budget_in_one_go(tmp_path, monkeypatch) -> None:
    """A run whose configured schedule does not fit: it plans fewer steps, compresses the
    learning-rate decay, ends 'completed' with a final evaluation, and says the plan once."""
    data = synthetic_data(tmp_path / "data", num_train=8, num_val=2)
    cfg = tiny_config(epochs=50, lr_decay="cosine", eval_interval=100)
    clock = [1000.0]

    def fake_time() -> float:  # each call advances the clock: about 1 s per training step
        clock[0] += 0.05
        return clock[0]

    real_step = T.train_step

    def slow_step(parts, batch, lr, stop=None):
        clock[0] += 1.0
        return real_step(parts, batch, lr, stop=stop)

    monkeypatch.setattr(T.time, "time", fake_time)
    monkeypatch.setattr(T, "train_step", slow_step)
    lines: list[str] = []
    monkeypatch.setattr(T.Console, "log", lambda self, text: lines.append(text))
    torch.manual_seed(0)
    result = train(
        cfg, data, tmp_path / "run", device="cpu", quiet=False, progress=False, time_limit=20.0, fit_to_time=True
    )
    assert result.status == "completed", result.message
    full = 50 * 2  # 8 images, batch 4
    assert 5 < result.steps < 20 < full
    assert result.last_metrics  # the final evaluation ran
    plans = [line for line in lines if line.startswith("time budget:")]
    assert 1 <= len(plans) <= 2, lines
    # The learning rate of the last step is near the end of the cosine: the decay was compressed.
    last_lr = [r["lr"] for r in result.history][-1]
    assert last_lr < 0.1 * cfg.train.base_lr
    assert math.isfinite(last_lr)
