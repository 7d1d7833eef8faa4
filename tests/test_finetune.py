"""Fine-tuning from another detector's weights (engine.finetune), freezing, and the EMA of the
weights (engine.ema): what is loaded and re-initialised, the report, refusal, backbone-only
transfer, MMDetection and training-checkpoint sources, freeze then thaw in one run, class names in
the saved weights, and an exact resume with EMA."""

from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from torch import nn

import nasfpn.engine.trainer as trainer_module
from deploy_helpers import fill_deterministic
from engine_utils import same_layout_data, tiny_config
from mmdet_reference import to_mmdet_keys
from nasfpn.cli import main
from nasfpn.core.config import config_to_yaml
from nasfpn.core.weights import WeightsError
from nasfpn.data.synthetic import SHAPE_CATEGORY_IDS, SHAPE_NAMES, generate_dataset
from nasfpn.deploy.predictor import export_weights
from nasfpn.engine.data_paths import DataPaths
from nasfpn.engine.ema import ModelEma
from nasfpn.engine.finetune import CLASS_KEYS, Freezer, parse_freeze, transfer_weights
from nasfpn.engine.trainer import train
from nasfpn.models import build_model

SOURCE_NAMES = tuple("abcdefgh")
PLAIN_CLASS_KEYS = ("head.retina_cls.weight", "head.retina_cls.bias")  # the class layer of a plain-conv head


def _cfg(num_classes: int = 8, names: tuple[str, ...] = SOURCE_NAMES, depth: int = 10, **train):
    cfg = tiny_config(deterministic=False, **train)
    m = cfg.model
    return replace(
        cfg,
        model=replace(
            m,
            backbone=replace(m.backbone, depth=depth),
            head=replace(m.head, num_classes=num_classes),
        ),
        data=replace(cfg.data, class_names=names, category_ids=tuple(range(1, num_classes + 1)) if names else ()),
    )


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Our .safetensors of an 8-class tiny detector whose every tensor differs from a fresh init."""
    cfg = _cfg()
    model = fill_deterministic(build_model(cfg.model, pretrained_backbone=False), seed="source")
    path = tmp_path_factory.mktemp("source") / "source.safetensors"
    export_weights(model, cfg, path)
    return path, model.state_dict()


def _fresh(cfg, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg.model, pretrained_backbone=False)


def _transfer(cfg, path, **kw):
    model = _fresh(cfg)
    lines: list[str] = []
    report = transfer_weights(model, cfg, lines.append, source=str(path), **kw)
    return model, report, "\n".join(lines)


def test_fitting_tensors_load_and_a_new_class_set_reinitialises_the_class_layer(source):
    path, src = source
    cfg = _cfg(3, ("x", "y", "z"))
    model, report, table = _transfer(cfg, path)
    fresh = _fresh(cfg).state_dict()
    state = model.state_dict()
    for key, value in state.items():
        expected = fresh[key] if key in CLASS_KEYS else src[key]
        assert torch.equal(value, expected), key
    # The class layer is exactly the start of any training: the focal-loss prior bias.
    assert torch.allclose(state["head.retina_cls.bias"], torch.full((9 * 3,), -math.log(99.0)))
    assert not torch.equal(state["head.retina_cls.weight"][:1], src["head.retina_cls.weight"][:1])
    assert sorted(report.reinitialised) == sorted(PLAIN_CLASS_KEYS)
    assert len(report.loaded) == len(state) - 2 and report.new == report.unused == report.kept == []
    assert "head.retina_cls (8 -> 3 classes)" in table and "loaded 100.0%" in table
    loaded_row = next(line for line in table.splitlines() if line.strip().startswith("loaded "))
    assert f"{len(state) - 2}" in loaded_row and "backbone (" in loaded_row and "head (" in loaded_row


def test_the_same_class_set_keeps_the_class_layer_other_names_do_not(source):
    path, src = source
    model, report, _ = _transfer(_cfg(), path)
    assert report.reinitialised == {} and torch.equal(
        model.state_dict()["head.retina_cls.weight"], src["head.retina_cls.weight"]
    )
    other = _cfg(8, SOURCE_NAMES[::-1])
    model, report, table = _transfer(other, path)
    assert report.reinitialised == dict.fromkeys(PLAIN_CLASS_KEYS, "other class names or order")
    assert torch.equal(model.state_dict()["head.retina_cls.bias"], _fresh(other).state_dict()["head.retina_cls.bias"])
    assert "other class names or order" in table


def test_weights_of_another_architecture_are_refused_unless_partial(source):
    path, src = source
    cfg = _cfg(3, ("x", "y", "z"), depth=50)  # bottleneck blocks: hardly any backbone tensor fits
    with pytest.raises(WeightsError) as err:
        _transfer(cfg, path)
    text = str(err.value)
    assert "--weights-partial" in text and "fits only" in text and "new (not in the file)" in text
    model, report, table = _transfer(replace(cfg, train=replace(cfg.train, transfer_partial=True)), path)
    assert report.fraction < 0.5 and report.loaded and report.new
    for key in report.loaded:
        assert torch.equal(model.state_dict()[key], src[key]), key
    assert "unused (not in the model)" in table


def test_backbone_only_transfer_keeps_neck_and_head_as_built(source):
    path, src = source
    cfg = _cfg(3, ("x", "y", "z"), transfer="backbone")
    model, report, table = _transfer(cfg, path)
    fresh = _fresh(cfg).state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, src[key] if key.startswith("backbone.") else fresh[key]), key
    assert report.reinitialised == {} and all(k.startswith(("neck.", "head.")) for k in report.kept)
    assert "kept as built" in table and "transfer backbone" in table
    # Backbone and neck:
    model, report, _ = _transfer(replace(cfg, train=replace(cfg.train, transfer="neck")), path)
    assert all(k.startswith("head.") for k in report.kept) and torch.equal(
        model.state_dict()["neck.lateral_convs.0.conv.weight"], src["neck.lateral_convs.0.conv.weight"]
    )


def test_an_mmdetection_checkpoint_is_accepted(source, tmp_path):
    _, src = source
    mmdet = to_mmdet_keys(src)
    mmdet["data_preprocessor.mean"] = torch.zeros(3)  # saved by MMDetection 3, no use here
    path = tmp_path / "mmdet.pth"
    torch.save({"state_dict": mmdet, "meta": {"dataset_meta": {"classes": list(SOURCE_NAMES)}}}, path)
    model, report, table = _transfer(_cfg(), path)  # the same classes, named in the file's meta
    assert report.kind == "mmdet" and report.reinitialised == {}
    assert report.unused == ["data_preprocessor.mean"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, src[key]), key
    assert "MMDetection checkpoint, 8 classes" in table


def test_freeze_spec_and_freezer():
    for bad in ("backbone", "head:1", "backbone:0", "backbone:x"):
        with pytest.raises(ValueError, match=r"train\.freeze"):
            parse_freeze(bad)
    assert parse_freeze("neck:1, backbone:3") == (("neck", 1), ("backbone", 3))
    cfg = _cfg()
    cfg = replace(cfg, model=replace(cfg.model, backbone=replace(cfg.model.backbone, frozen_stages=1)))
    model = build_model(cfg.model, pretrained_backbone=False)
    stem = model.backbone.conv1.weight  # frozen by the model config: stays frozen
    assert not stem.requires_grad
    freezer, lines = Freezer(model, "neck:1,backbone:2"), []
    expected = {0: (False, False), 1: (False, True), 2: (True, True)}  # (backbone, neck) trainable
    for epoch, (backbone, neck) in expected.items():
        model.train()
        freezer.apply(epoch, lines.append)
        assert model.backbone.layer2[0].conv1.weight.requires_grad is backbone
        assert model.backbone.layer2[0].bn1.training is backbone
        assert all(p.requires_grad is neck for p in model.neck.parameters())
        assert all(p.requires_grad for p in model.head.parameters()) and not stem.requires_grad
    assert lines[0].startswith("epoch 1: backbone frozen through epoch 2, neck frozen through epoch 1")
    assert lines[-1] == "epoch 3: every part trains"


def test_ema_update_and_warm_up():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEma(model, 0.9, tau=2.0)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    model.train()
    model(torch.randn(4, 3))  # BN statistics and num_batches_tracked move
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()
    d = 0.9 * (1 - math.exp(-1 / 2.0))
    assert ema.decay_at(1) == pytest.approx(d) and ema.decay_at(10_000) == pytest.approx(0.9)
    for key, value in model.state_dict().items():
        got = ema.module.state_dict()[key]
        if value.is_floating_point():
            assert torch.allclose(got, d * start[key] + (1 - d) * value, atol=1e-7), key
        else:
            assert torch.equal(got, value), key
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError, match=r"train\.ema"):
        ModelEma(model, 1.0)


# --------------------------------------------------------------------------- training runs
@pytest.fixture(scope="module")
def new_task(tmp_path_factory):
    """3 of the 8 shape classes: 4 training images (2 steps of 2 per epoch), 2 validation images."""
    ds = generate_dataset(tmp_path_factory.mktemp("new_task"), 4, 2, image_size=128, seed=1, num_classes=3)
    return DataPaths(ds.train_annotations, ds.train_images, ds.val_annotations, ds.val_images)


def _finetune_cfg(source_path):
    # Warm-up of 1 step (tau) so that the EMA visibly differs from the trained weights after 4 steps.
    cfg = _cfg(names=(), init_weights=str(source_path), freeze="backbone:1", ema=0.5, ema_tau=1.0, base_lr=0.05)
    return replace(cfg, data=replace(cfg.data, batch_size=2))


def _record_steps(monkeypatch):
    """Every step's backbone state, read when the step starts."""
    seen: list[dict] = []
    original = trainer_module.train_step

    def step(parts, batch, lr, stop=None):
        model = parts.loss_module.model
        conv = model.backbone.layer2[0].conv1.weight
        seen.append(
            {
                "grad": conv.requires_grad,
                "bn_train": model.backbone.layer2[0].bn1.training,
                "conv": conv.detach().clone(),
            }
        )
        return original(parts, batch, lr, stop)

    monkeypatch.setattr(trainer_module, "train_step", step)
    return seen


@pytest.fixture(scope="module")
def finetuned(source, new_task, tmp_path_factory):
    """``nasfpn train --weights`` with a frozen backbone for epoch 1 and EMA, 2 epochs."""
    path, _ = source
    root = tmp_path_factory.mktemp("finetuned")
    cfg_file = root / "tiny.yaml"
    cfg = _cfg(names=())  # the classes come from the data
    cfg_file.write_text(config_to_yaml(replace(cfg, data=replace(cfg.data, batch_size=2))))
    out = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        seen = _record_steps(mp)
        argv = [
            "train", str(cfg_file), "--train-ann", str(new_task.train_ann), "--train-images", str(new_task.train_images),
            "--val-ann", str(new_task.val_ann), "--val-images", str(new_task.val_images), "--out", str(out),
            "--weights", str(path), "--freeze", "backbone:1", "--ema", "0.5", "--set", "train.ema_tau=1",
            "--set", "train.base_lr=0.05", "--device", "cpu", "--no-progress",
        ]  # fmt: skip
        assert main(argv) == 0
    return out, seen


def test_finetuning_run_freezes_then_thaws_and_saves_the_new_classes(finetuned, source, capsys):
    out, seen = finetuned
    _, src = source
    assert [s["grad"] for s in seen] == [False, False, True, True]
    assert [s["bn_train"] for s in seen] == [False, False, True, True]
    key = "backbone.layer2.0.conv1.weight"
    assert all(torch.equal(s["conv"], src[key]) for s in seen[:3])  # loaded, then untouched while frozen
    assert not torch.equal(seen[3]["conv"], src[key])  # epoch 2 trains it
    with safe_open(str(out / "last.safetensors"), framework="pt") as f:
        saved = json.loads(f.metadata()["config"])
        weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert tuple(saved["data"]["class_names"]) == SHAPE_NAMES[:3]
    assert tuple(saved["data"]["category_ids"]) == SHAPE_CATEGORY_IDS[:3]
    assert saved["model"]["head"]["num_classes"] == 3
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["ema"]["updates"] == 4
    # The saved weights are the EMA, which differs from the weights under training.
    assert all(torch.equal(weights[k], ckpt["model"][k]) for k in weights)
    assert not torch.equal(
        ckpt["model"]["head.retina_reg.weight"], ckpt["ema"]["train_model"]["head.retina_reg.weight"]
    )


def test_a_training_checkpoint_is_a_source_with_its_classes(finetuned):
    out, _ = finetuned
    cfg = _cfg(3, SHAPE_NAMES[:3])
    model, report, table = _transfer(cfg, out / "best.pt")
    assert report.kind == "checkpoint" and report.reinitialised == {}  # the same 3 classes
    ckpt = torch.load(out / "best.pt", weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, ckpt["model"][key]), key
    assert "training checkpoint, 3 classes" in table


def test_resumed_finetuning_with_ema_is_exact(finetuned, source, new_task, tmp_path):
    """Stopped after 3 of 4 steps and resumed: EMA, trained weights and counters equal the
    uninterrupted run's (the resumed run must not load --weights over its checkpoint)."""
    ref = torch.load(finetuned[0] / "last.pt", weights_only=True)
    cfg = _finetune_cfg(source[0])  # the CLI run's settings
    first = train(cfg, new_task, tmp_path, device="cpu", quiet=True, max_steps=3)
    assert first.status == "max_steps"
    second = train(cfg, new_task, tmp_path, resume=True, device="cpu", quiet=True)
    assert second.status == "completed" and second.steps == 4
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["ema"]["updates"] == ref["ema"]["updates"] == 4
    for part in ("model", "train"):
        mine = ckpt["model"] if part == "model" else ckpt["ema"]["train_model"]
        theirs = ref["model"] if part == "model" else ref["ema"]["train_model"]
        for key in theirs:
            assert torch.equal(mine[key], theirs[key]), (part, key)


def test_bad_settings_fail_before_training(source, new_task, tmp_path, capsys):
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(config_to_yaml(_cfg(names=())))
    base = [
        "train",
        str(cfg_file),
        "--train-ann",
        str(new_task.train_ann),
        "--train-images",
        str(new_task.train_images),
    ]
    base += ["--out", str(tmp_path / "run"), "--device", "cpu"]
    assert main([*base, "--freeze", "head:2"]) == 2
    assert "train.freeze='head:2'" in capsys.readouterr().err
    assert main([*base, "--ema", "1.5"]) == 2
    assert "train.ema=1.5" in capsys.readouterr().err
    assert not (tmp_path / "run" / "last.pt").exists()


# --------------------------------------------------------------------------- several processes
def _ddp_config(batch_size: int):
    cfg = tiny_config(epochs=2, sync_bn=True, warmup_iters=1, base_lr=0.02, milestones=(), deterministic=False)
    cfg = replace(cfg, train=replace(cfg.train, freeze="backbone:1", ema=0.5, ema_tau=1.0))
    return replace(cfg, data=replace(cfg.data, batch_size=batch_size, scale_range=(1.0, 1.0), flip_prob=0.0))


def _ddp_worker(rank: int, world: int, port: int, data, out_dir: str, result_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    result = train(_ddp_config(batch_size=2), data, out_dir, device="cpu", quiet=True, progress=False)
    assert result.status == "completed", result.message
    torch.save({k: v.detach().clone() for k, v in result.model.state_dict().items()}, f"{result_dir}/rank{rank}.pt")


@pytest.mark.slow
def test_ddp_freeze_then_thaw_with_ema_matches_one_process(tmp_path):
    """2 x 2 images (gloo, SyncBN) against 1 x 4, with the backbone frozen for epoch 1 and EMA: the
    thawed backbone's gradients are all-reduced (DDP is rebuilt), so both runs agree."""
    data = same_layout_data(tmp_path / "data", num=8)
    results = tmp_path / "results"
    results.mkdir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, data, str(tmp_path / "ddp"), str(results)), nprocs=2, join=True)
    s0 = torch.load(results / "rank0.pt", weights_only=True)
    s1 = torch.load(results / "rank1.pt", weights_only=True)
    single = train(_ddp_config(batch_size=4), data, tmp_path / "single", device="cpu", quiet=True, progress=False)
    ref = single.model.state_dict()
    torch.manual_seed(0)
    init = build_model(single.config.model, pretrained_backbone=False).state_dict()
    key = "backbone.layer2.0.conv1.weight"
    assert (ref[key] - init[key]).abs().max() > 1e-4  # the backbone trained in epoch 2
    for k, v in ref.items():
        assert torch.equal(s0[k], s1[k]), f"ranks differ in {k}"
        if v.is_floating_point():
            diff = (s0[k].double() - v.double()).abs().max().item() / max(1.0, v.double().abs().max().item())
            assert diff < 1e-4, f"2-process run differs from 1-process run in {k} by {diff:.3g}"
