"""``nasfpn demo``: schedule planning and a shrunken end-to-end run (the full demo takes minutes)."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

import nasfpn
import nasfpn.apps.demo as demo
from nasfpn.apps.demo import demo_config, plan_schedule, run_demo
from nasfpn.core.presets import PRESETS


def test_plan_keeps_a_schedule_that_fits():
    cfg = demo_config()
    planned, total, text = plan_schedule(cfg, num_train=160, step_seconds=0.001, budget_seconds=600)
    steps = -(-160 // cfg.data.batch_size)
    assert total == cfg.train.epochs * steps and f"{cfg.train.epochs} epochs" in text
    assert planned.model == cfg.model and planned.train.epochs == cfg.train.epochs


def test_plan_fits_the_budget_with_about_three_evaluations():
    cfg = demo_config(["train.epochs=20"])
    steps = -(-160 // cfg.data.batch_size)  # 10
    planned, total, text = plan_schedule(cfg, num_train=160, step_seconds=1.0, budget_seconds=100.0, num_val=16)
    # 100 s less a 3% margin, at 1 s per step, less the final evaluation of 20.3 s (estimated: scoring
    # and checkpoint 20 steps' time on a CPU this slow, the forward of 16 images 1/3 step): 76 steps;
    # so few steps fit that no evaluation is made before the end.
    assert total == 76 and f"about {total} steps" in text
    assert planned.train.epochs == 20  # the trainer compresses the schedule, the config keeps its length
    assert planned.train.eval_interval > planned.train.epochs  # only the final evaluation
    _, one, _ = plan_schedule(cfg, num_train=160, step_seconds=100.0, budget_seconds=1.0)
    assert one == 1 and steps == 10
    # Where EVAL_DURING_MIN_STEPS fit, about three evaluations are spread over the run.
    long = demo_config(["train.epochs=500"])
    planned, total, _ = plan_schedule(long, num_train=160, step_seconds=0.04, budget_seconds=100.0, num_val=16)
    assert total >= demo.EVAL_DURING_MIN_STEPS
    assert 2 <= total / steps / planned.train.eval_interval <= 4


def test_demo_config_is_the_tiny_preset():
    cfg, tiny = demo_config(), PRESETS["nasfpn_tiny"]
    assert (cfg.model.backbone, cfg.model.neck, cfg.model.head) == (
        tiny.model.backbone,
        tiny.model.neck,
        tiny.model.head,
    )
    assert cfg.model.loss.pos_iou_thr == 0.4 and cfg.data.cache_images
    assert (cfg.train.optimizer, cfg.train.base_lr, cfg.train.weight_decay) == ("adamw", 0.004, 0.05)
    assert (
        replace(cfg.train, optimizer="sgd", base_lr=tiny.train.base_lr, weight_decay=tiny.train.weight_decay)
        == tiny.train
    )


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
    # The budget counts from ``started`` (the command line's process start, before its imports).
    started = time.time() - 60.0
    result = run_demo(tmp_path, minutes=5, overrides=overrides, num_train=8, num_val=4, progress=False, started=started)
    assert result.ok and result.epochs == 1, result.status
    assert result.wall_time >= 60.0
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


def test_the_command_clock_starts_before_the_heavy_imports():
    import nasfpn._clock as clock

    assert time.time() >= clock.STARTED
    # nasfpn/__init__.py imports it first: nothing of torch's import time comes before it
    lines = Path(nasfpn.__file__).read_text().splitlines()
    assert next(line for line in lines if line.startswith(("import ", "from "))).startswith("from nasfpn import _clock")
