"""The training loop on a tiny model and tiny synthetic data: files, checkpoints, exact resume,
non-finite losses, unreadable images, data checks, deep supervision, CLI train/eval."""

from __future__ import annotations

import copy
import csv
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml

import nasfpn
from engine_utils import read_log, synthetic_data, tiny_config, train_args
from nasfpn.cli import main
from nasfpn.core.config import config_to_yaml
from nasfpn.engine.coco_metrics import STAT_KEYS
from nasfpn.engine.trainer import DataPaths, TrainStep, train
from nasfpn.models import RetinaNet, build_model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = train(tiny_config(), data, out, progress=False, quiet=True)
    return out, result


def test_run_writes_everything(full_run):
    out, result = full_run
    assert result.status == "completed" and result.ok
    assert (result.epochs, result.steps) == (2, 6)  # 12 images / batch 4 = 3 steps per epoch
    assert result.wall_time > 0
    for name in (
        "config.yaml",
        "log.jsonl",
        "metrics.csv",
        "metrics.json",
        "summary.json",
        "last.pt",
        "best.pt",
        "last.safetensors",
        "best.safetensors",
        "loss.png",
        "ap.png",
    ):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    # Classes come from the training annotations and are saved with the config.
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"]["head"]["num_classes"] == 8
    assert cfg["data"]["category_ids"] == [1, 2, 4, 5, 7, 8, 11, 13]
    assert cfg["data"]["class_names"][0] == "ellipse"
    # Metrics: one row per epoch, the 12 COCO numbers in the result.
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(r["AP50"] != "" for r in rows) and float(rows[-1]["loss"]) > 0
    assert set(STAT_KEYS) <= set(result.last_metrics) and "per_class" in result.last_metrics
    assert result.best_metrics["AP"] == max(float(r["AP"]) for r in rows)
    # LR of each step: warm-up over 2 steps from 0.1x, then x0.1 from epoch 1.
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(6))
    assert [round(r["lr"], 10) for r in log] == [0.001, 0.0055, 0.01, 0.001, 0.001, 0.001]
    assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in log)


def test_checkpoint_contents(full_run):
    out, result = full_run
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["format"] == "nasfpn-train" and ckpt["version"] == 1
    assert (ckpt["step"], ckpt["epoch"], ckpt["iter_in_epoch"]) == (6, 2, 0)
    assert not any(k.startswith(("module.", "_orig_mod.", "model.")) for k in ckpt["model"])
    assert {"optimizer", "scaler", "rng", "data", "history", "best", "config"} <= set(ckpt)
    assert set(ckpt["rng"]) == {"python", "numpy", "torch", "cuda"}
    model = build_model(replace(result.config.model), pretrained_backbone=False)
    model.load_state_dict(ckpt["model"])  # the config in the file rebuilds the model
    # The safetensors weights load through the public API, with the dataset's classes.
    det = nasfpn.load(weights=out / "best.safetensors")
    assert det.class_names[:2] == ("ellipse", "rectangle") and det.category_ids[-1] == 13
    preds = det.predict([np.zeros((100, 120, 3), dtype=np.uint8)])
    assert preds[0]["boxes"].shape[1] == 4


def test_resume_mid_epoch_is_exact(full_run, data, tmp_path):
    """Stop after 2 of 6 steps (mid-epoch), resume: the remaining losses equal the uninterrupted run's."""
    ref_log = read_log(full_run[0])
    first = train(tiny_config(), data, tmp_path, progress=False, quiet=True, max_steps=2)
    assert first.status == "max_steps" and first.steps == 2
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["iter_in_epoch"]) == (0, 2)
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny_config(), data, tmp_path, progress=False, quiet=True)
    second = train(tiny_config(), data, tmp_path, resume=True, progress=False, quiet=True)
    assert second.status == "completed" and second.steps == 6
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == list(range(6))
    for mine, ref in zip(log, ref_log):
        for key in ("loss", "loss_cls", "loss_bbox", "lr"):
            assert mine[key] == ref[key], (mine["step"], key, mine[key], ref[key])
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]


def _nan_loss_on(calls):
    """A RetinaNet.loss that returns a NaN total on the given (0-based) calls."""
    original = RetinaNet.loss
    count = {"n": 0}

    def loss(self, outputs, targets):
        out = original(self, outputs, targets)
        if count["n"] in calls:
            out = dict(out, loss=out["loss"] * float("nan"))
        count["n"] += 1
        return out

    return loss


def test_nonfinite_steps_are_skipped(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(RetinaNet, "loss", _nan_loss_on({0, 1}))
    torch.manual_seed(0)
    initial = build_model(tiny_config().model, pretrained_backbone=False).state_dict()
    result = train(tiny_config(epochs=1), data, tmp_path, progress=False, quiet=True, max_steps=2)
    assert result.status == "max_steps" and result.skipped_steps == 2
    # Nothing changed: no update, BN running statistics restored.
    state = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(state[k], initial[k]) for k in initial if k in state)
    result = train(tiny_config(epochs=1), data, tmp_path, resume=True, progress=False, quiet=True)
    assert result.status == "completed" and result.skipped_steps == 2
    log = read_log(tmp_path)
    assert [r["skipped"] for r in log] == [True, True, False]
    err = capsys.readouterr().err
    assert "step 0: non-finite loss" in err and "loss=nan" in err and "2 in a row" in err
    state = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_too_many_nonfinite_steps_stop_the_run(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(RetinaNet, "loss", _nan_loss_on(set(range(2, 100))))
    cfg = tiny_config(max_bad_steps=2)
    cfg = replace(cfg, data=replace(cfg.data, batch_size=6))  # 2 steps per epoch
    result = train(cfg, data, tmp_path, progress=False, quiet=True)
    assert result.status == "diverged" and not result.ok
    assert "2 non-finite losses in a row" in result.message and "last.pt" in result.message
    # The last good checkpoint (end of epoch 1, step 2) is kept, not overwritten.
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged"


def test_unreadable_image_mid_run_is_skipped(tmp_path, caplog):
    data = synthetic_data(tmp_path / "data", num_train=8, num_val=2)
    victim = sorted((tmp_path / "data" / "train").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:120])  # the header survives, decoding fails
    with caplog.at_level("WARNING"):
        result = train(tiny_config(epochs=1), data, tmp_path / "run", progress=False, quiet=True)
    assert result.status == "completed" and result.steps == 2
    assert any(victim.name in r.getMessage() for r in caplog.records)


def test_bad_data_fails_with_report_unless_skipped(tmp_path):
    data = synthetic_data(tmp_path / "data", num_train=8, num_val=2)
    ann = json.loads((tmp_path / "data" / "annotations" / "instances_train.json").read_text())
    ann["images"].append({"id": 999, "file_name": "missing.png", "width": 128, "height": 128})
    ann["annotations"].append(
        {"id": 9999, "image_id": 999, "category_id": 1, "bbox": [1, 1, 20, 20], "area": 400, "iscrowd": 0}
    )
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(ann))
    paths = DataPaths(bad, data.train_images, data.val_ann, data.val_images)
    with pytest.raises(ValueError, match="missing_image"):
        train(tiny_config(epochs=1), paths, tmp_path / "run", progress=False, quiet=True)
    result = train(tiny_config(epochs=1), paths, tmp_path / "run", progress=False, quiet=True, skip_invalid=True)
    assert result.status == "completed" and result.steps == 2  # the 8 good images only


def test_deep_supervision_loss_is_mean_over_stacks():
    cfg = tiny_config().model
    cfg = replace(cfg, neck=replace(cfg.neck, stacks=3), head=replace(cfg.head, deep_supervision=True))
    torch.manual_seed(0)
    model = build_model(cfg, pretrained_backbone=False).train()
    images = torch.randn(2, 3, 128, 128)
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 70.0, 90.0]]), "labels": torch.tensor([3])}] * 2
    reference = copy.deepcopy(model)
    out = TrainStep(model, deep_supervision=True)(images, targets)
    per_stack = [reference.loss(o, targets)["loss"] for o in reference.forward_stacks(images)]
    assert len(per_stack) == 3
    assert torch.allclose(out["loss"], torch.stack(per_stack).mean(), rtol=1e-5)
    out["loss"].backward()
    first_stack = model.neck.fpn_stages[0]
    assert all(p.grad is not None for p in first_stack.parameters())


def test_cli_train_eval_and_score(data, tmp_path, capsys):
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(config_to_yaml(tiny_config()))
    run = tmp_path / "run"
    rc = main(
        [
            *train_args(cfg_file, data, run),
            "--epochs",
            "1",
            "--batch-size",
            "6",
            "--seed",
            "3",
            "--no-progress",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "lr = base_lr 0.01 x total batch 6" in out and "= 0.015" in out
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["train"]["epochs"], saved["data"]["batch_size"], saved["train"]["seed"]) == (1, 6, 3)

    ev = tmp_path / "eval"
    rc = main(
        [
            "eval",
            "--weights",
            str(run / "last.safetensors"),
            "--val-ann",
            str(data.val_ann),
            "--val-images",
            str(data.val_images),
            "--out",
            str(ev),
            "--workers",
            "0",
            "--no-progress",
        ]
    )
    assert rc == 0
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in capsys.readouterr().out
    metrics = json.loads((ev / "metrics.json").read_text())
    assert set(STAT_KEYS) <= set(metrics)
    results = json.loads((ev / "results.json").read_text())
    assert {r["category_id"] for r in results} <= {1, 2, 4, 5, 7, 8, 11, 13}

    rc = main(
        ["eval", "--ann", str(data.val_ann), "--results", str(ev / "results.json"), "--json", str(tmp_path / "m.json")]
    )
    assert rc == 0
    rescored = json.loads((tmp_path / "m.json").read_text())
    assert rescored["AP"] == pytest.approx(metrics["AP"]) and rescored["AP50"] == pytest.approx(metrics["AP50"])

    # The fp32 fast path scores like the plain model; bf16 runs and says so in metrics.json.
    for flags, name in ((["--fast"], "fast"), (["--precision", "bf16"], "bf16")):
        rc = main(
            [
                "eval",
                "--weights",
                str(run / "last.safetensors"),
                "--val-ann",
                str(data.val_ann),
                "--val-images",
                str(data.val_images),
                "--out",
                str(tmp_path / name),
                "--workers",
                "0",
                "--no-progress",
                *flags,
            ]
        )
        assert rc == 0
        got = json.loads((tmp_path / name / "metrics.json").read_text())
        assert got["optimize"] == {"precision": "fp32" if name == "fast" else "bf16"}
    fast = json.loads((tmp_path / "fast" / "metrics.json").read_text())
    assert fast["AP"] == pytest.approx(metrics["AP"], abs=1e-3) and fast["AP50"] == pytest.approx(
        metrics["AP50"], abs=1e-3
    )


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_and_channels_last_steps(data, tmp_path, amp):
    cfg = tiny_config(epochs=1, amp=amp, channels_last=True, grad_clip=10.0)
    result = train(cfg, DataPaths(data.train_ann, data.train_images), tmp_path, progress=False, quiet=True, max_steps=2)
    assert result.status == "max_steps" and result.steps == 2 and result.last_metrics == {}
    log = read_log(tmp_path)
    assert all(math.isfinite(r["loss"]) for r in log)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (ckpt["scaler"] is not None) == (amp == "fp16")
