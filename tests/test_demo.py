"""``nasfpn demo``: schedule planning and a shrunken end-to-end run (the full demo takes minutes)."""

from __future__ import annotations

import json

import torch

import nasfpn.apps.demo as demo
from nasfpn.apps.demo import demo_config, plan_schedule, run_demo
from nasfpn.core.presets import PRESETS


def test_plan_keeps_a_schedule_that_fits():
    cfg = demo_config()
    planned, text = plan_schedule(cfg, num_train=160, step_seconds=0.01, budget_seconds=600)
    assert planned == cfg and f"{cfg.train.epochs} epochs" in text


def test_plan_scales_epochs_and_milestones_down():
    cfg = demo_config(["train.epochs=20", "train.milestones=[16,19]", "train.eval_interval=2"])
    steps = -(-160 // cfg.data.batch_size)
    # Room for about 10 of the 20 epochs.
    planned, text = plan_schedule(cfg, num_train=160, step_seconds=1.0, budget_seconds=10 * steps * 1.15 + 1)
    t = planned.train
    assert t.epochs == 10 and t.milestones == (8, 9) and t.eval_interval == 1
    assert "10 of 20 epochs fit" in text
    planned, _ = plan_schedule(cfg, num_train=160, step_seconds=100.0, budget_seconds=1.0)
    assert planned.train.epochs == 1 and planned.train.milestones == ()


def test_demo_config_is_the_tiny_preset():
    assert demo_config().model == PRESETS["nasfpn_tiny"].model


def test_demo_end_to_end_small(tmp_path, capsys):
    overrides = [
        "model.backbone.depth=10",
        "model.neck.channels=16",
        "model.neck.stacks=1",
        "model.head.feat_channels=16",
        "model.head.stacked_convs=1",
        "data.image_size=128",
        "data.batch_size=4",
        "data.workers=0",
        "train.epochs=1",
        "train.warmup_iters=2",
    ]
    result = run_demo(tmp_path, minutes=5, overrides=overrides, num_train=8, num_val=4, progress=False)
    assert result.ok and result.epochs == 1
    out = capsys.readouterr().out
    assert "[1/4]" in out and "[4/4]" in out and "Average Precision" in out and "AP50" in out
    assert {"AP", "AP50", "per_class"} <= set(result.metrics)
    for path in (
        "data/annotations/instances_train.json",
        "run/best.safetensors",
        "run/loss.png",
        "run/ap.png",
        "run/metrics.csv",
        "detections.png",
    ):
        assert (tmp_path / path).is_file(), path
    assert len(list((tmp_path / "detections").glob("*.png"))) == 4
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed"


def test_fastest_setup_prefers_bf16_only_when_clearly_faster(monkeypatch):
    cfg = demo_config()
    threads = torch.get_num_threads()
    seen = []

    def fake_step(times):
        def step(c, device, data):
            seen.append((torch.get_num_threads(), c.train.amp))
            return times[c.train.amp]

        return step

    try:
        monkeypatch.setattr(demo, "_step_seconds", fake_step({"none": 1.0, "bf16": 0.6}))
        chosen, step_s = demo._fastest_setup(cfg, torch.device("cpu"), None)
        assert chosen.train.amp == "bf16" and step_s == 0.6
        assert {amp for _, amp in seen} == {"none", "bf16"}
        # A few percent faster is not worth the change of numerics.
        monkeypatch.setattr(demo, "_step_seconds", fake_step({"none": 1.0, "bf16": 0.95}))
        assert demo._fastest_setup(cfg, torch.device("cpu"), None)[0].train.amp == "none"
        # A precision the user chose is kept.
        seen.clear()
        monkeypatch.setattr(demo, "_step_seconds", fake_step({"none": 1.0, "bf16": 0.1}))
        assert demo._fastest_setup(cfg, torch.device("cpu"), None, user_amp=True)[0].train.amp == "none"
        assert {amp for _, amp in seen} == {"none"}
    finally:
        torch.set_num_threads(threads)
