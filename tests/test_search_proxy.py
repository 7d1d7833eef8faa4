"""Proxy task: held-out split, proxy config, full-size config, data preparation, CLI."""

import json
from pathlib import Path

import pytest

from nasfpn.cli import main
from nasfpn.models.nasfpn import FPN_CELLS_GENOTYPE, NASFPN_GENOTYPE, parse_genotype
from nasfpn.search.proxy import (
    PAPER_HELD_OUT,
    FakeEvaluator,
    ProxySettings,
    ProxyTask,
    full_size_config,
    genotype_similarity,
    prepare_proxy_task,
    proxy_config,
    split_held_out,
)


def _coco(path: Path, n: int) -> Path:
    images = [{"id": 100 + i, "file_name": f"{i}.png", "width": 64, "height": 64} for i in range(n)]
    anns = [
        {"id": i + 1, "image_id": 100 + i, "category_id": 3, "bbox": [1, 1, 10, 10], "area": 100, "iscrowd": 0}
        for i in range(n)
    ]
    path.write_text(
        json.dumps({"images": images, "annotations": anns, "categories": [{"id": 3, "name": "x"}], "info": {"v": 1}})
    )
    return path


def test_held_out_split_is_deterministic_and_disjoint(tmp_path):
    ann = _coco(tmp_path / "train.json", 50)
    train, held = split_held_out(ann, tmp_path / "a", 10, seed=0)
    train2, held2 = split_held_out(ann, tmp_path / "b", 10, seed=0)
    assert train.read_text() == train2.read_text() and held.read_text() == held2.read_text()
    t, h = json.loads(train.read_text()), json.loads(held.read_text())
    ids_t, ids_h = {i["id"] for i in t["images"]}, {i["id"] for i in h["images"]}
    assert len(ids_h) == 10 and len(ids_t) == 40 and not ids_t & ids_h
    assert {a["image_id"] for a in h["annotations"]} == ids_h
    assert t["categories"] == h["categories"] and h["info"] == {"v": 1}
    _, other = split_held_out(ann, tmp_path / "c", 10, seed=1)
    assert other.read_text() != held.read_text()
    _, frac = split_held_out(ann, tmp_path / "d", 0.2)
    assert len(json.loads(frac.read_text())["images"]) == 10
    with pytest.raises(ValueError, match="cannot hold out"):
        split_held_out(ann, tmp_path / "e", 50)
    assert PAPER_HELD_OUT == 7392


def test_proxy_config_and_full_size_config():
    s = ProxySettings()
    cfg = proxy_config(NASFPN_GENOTYPE, s, 8)
    assert cfg.model.backbone.depth == 10 and cfg.model.backbone.pretrained is None
    assert cfg.model.neck.stacks == s.stacks and cfg.model.neck.channels == s.width
    assert parse_genotype(cfg.model.neck.genotype) == NASFPN_GENOTYPE
    assert cfg.data.image_size == 128 and cfg.train.epochs == s.epochs and cfg.train.eval_interval == s.epochs
    assert cfg.train.optimizer == "sgd" and cfg.model.loss.pos_iou_thr == cfg.model.loss.neg_iou_thr == 0.5
    fast = proxy_config(NASFPN_GENOTYPE, ProxySettings(optimizer="adamw", lr=4e-3, weight_decay=0.05, match_iou=0.4), 8)
    assert (fast.train.optimizer, fast.train.base_lr, fast.train.weight_decay) == ("adamw", 4e-3, 0.05)
    assert fast.model.loss.pos_iou_thr == fast.model.loss.neg_iou_thr == 0.4
    with pytest.raises(ValueError, match="optimizer"):
        ProxySettings(optimizer="lamb")
    with pytest.raises(ValueError, match="match_iou"):
        ProxySettings(match_iou=1.0)
    full = full_size_config(FPN_CELLS_GENOTYPE)
    assert full.name == "retinanet_r50_nasfpn_searched_crop640_50e"
    assert parse_genotype(full.model.neck.genotype) == FPN_CELLS_GENOTYPE
    assert full.model.neck.stacks == 7 and full.model.backbone.depth == 50


def test_prepare_proxy_task_on_synthetic_data(tmp_path):
    task = prepare_proxy_task(tmp_path, ProxySettings(), data="synthetic", synthetic_images=20, synthetic_min_size=0.1)
    assert len(task.class_names) == 8 and len(task.category_ids) == 8
    train = json.loads(Path(task.train_ann).read_text())
    held = json.loads(Path(task.heldout_ann).read_text())
    assert len(train["images"]) == 16 and len(held["images"]) == 4
    assert min(min(a["bbox"][2:]) for a in train["annotations"]) >= 0.1 * 128  # synthetic_min_size
    assert Path(task.images).is_dir()
    with pytest.raises(ValueError, match="name the data"):
        prepare_proxy_task(tmp_path)


def test_fake_evaluator_prefers_the_published_architecture(tmp_path):
    fake = FakeEvaluator(noise=0.0)
    assert fake(NASFPN_GENOTYPE, tmp_path)["reward"] == 1.0
    assert fake(FPN_CELLS_GENOTYPE, tmp_path)["reward"] < 0.5
    assert genotype_similarity(FPN_CELLS_GENOTYPE, FPN_CELLS_GENOTYPE) == 1.0


def test_cli_search_and_resume(tmp_path, capsys):
    out = tmp_path / "s"
    assert (
        main(
            [
                "search",
                "--fake-evaluator",
                "--controller",
                "evolution",
                "--trials",
                "6",
                "--workers",
                "0",
                "--population",
                "3",
                "--tournament",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "best: trial" in text and "baseline nasfpn" in text
    assert main(["search", "--out", str(out), "--resume", "--trials", "9", "--workers", "0"]) == 0
    lines = [json.loads(x) for x in (out / "trials.jsonl").read_text().splitlines()]
    assert sorted(r["trial"] for r in lines if "trial" in r and r["status"] != "running") == list(range(9))
    saved = json.loads((out / "search.json").read_text())
    assert saved["controller"] == "evolution" and saved["trials"] == 9
    assert main(["search", "--fake-evaluator", "--trials", "2", "--workers", "0", "--out", str(out)]) == 2


@pytest.mark.slow
def test_a_real_proxy_trial(tmp_path):
    """One short proxy training on the synthetic data: a finite AP reward and its costs."""
    settings = ProxySettings(epochs=1)
    task = prepare_proxy_task(tmp_path, settings, data="synthetic", synthetic_images=40)
    assert isinstance(task, ProxyTask)
    out = task(NASFPN_GENOTYPE, tmp_path / "trial", "cpu")
    assert 0.0 <= out["reward"] <= 1.0 and out["metrics"]["AP"] == out["reward"]
    assert out["cost"]["params"] > 1e6 and out["cost"]["flops"] > 1e8 and out["cost"]["train_s"] > 0
    assert not (tmp_path / "trial" / "last.pt").exists()  # deleted once the reward is known


@pytest.mark.parametrize("keep", [False, True])
def test_a_finished_trial_keeps_its_checkpoints_only_when_asked(tmp_path, keep, one_thread):
    settings = ProxySettings(image_size=128, epochs=1, width=16, head_convs=1, batch_size=4, warmup_iters=1)
    task = prepare_proxy_task(tmp_path, settings, data="synthetic", synthetic_images=10, keep_weights=keep)
    out = task(NASFPN_GENOTYPE, tmp_path / "trial", "cpu")
    assert 0.0 <= out["reward"] <= 1.0
    trial = tmp_path / "trial"
    assert (trial / "metrics.json").is_file() and (trial / "config.yaml").is_file()
    for name in ("last.pt", "best.pt", "last.safetensors", "best.safetensors"):
        assert (trial / name).is_file() == keep, name


def test_proxy_precision_sets_autocast_and_channels_last(tmp_path, one_thread):
    train = proxy_config(NASFPN_GENOTYPE, ProxySettings(), 3).train
    assert train.amp == "none" and not train.channels_last
    train = proxy_config(NASFPN_GENOTYPE, ProxySettings(precision="bf16"), 3).train
    assert train.amp == "bf16" and train.channels_last
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        ProxySettings(precision="int8")
    settings = ProxySettings(
        image_size=128, epochs=1, width=16, head_convs=1, batch_size=4, warmup_iters=1, precision="bf16"
    )
    task = prepare_proxy_task(tmp_path, settings, data="synthetic", synthetic_images=10)
    assert 0.0 <= task(NASFPN_GENOTYPE, tmp_path / "trial", "cpu")["reward"] <= 1.0


def test_proxy_seeds_average_and_a_rerun_reuses_finished_runs(tmp_path, one_thread):
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        ProxySettings(seeds=0)
    settings = ProxySettings(image_size=128, epochs=1, width=16, head_convs=1, batch_size=4, warmup_iters=1, seeds=2)
    task = prepare_proxy_task(tmp_path, settings, data="synthetic", synthetic_images=10)
    assert [task.config(NASFPN_GENOTYPE, k).train.seed for k in (0, 1)] == [0, 1]
    trial = tmp_path / "trial"
    out = task(NASFPN_GENOTYPE, trial, "cpu")
    runs = [json.loads((trial / f"seed{k}" / "proxy_result.json").read_text()) for k in (0, 1)]
    assert out["metrics"]["AP_per_seed"] == [r["AP"] for r in runs]
    assert out["reward"] == pytest.approx((runs[0]["AP"] + runs[1]["AP"]) / 2)
    assert out["cost"]["train_s"] == pytest.approx(runs[0]["train_s"] + runs[1]["train_s"], abs=0.02)
    assert not (trial / "seed0" / "last.pt").exists()
    # A trial run again (its search stopped before logging it) trains only what it had not finished.
    (trial / "seed1" / "proxy_result.json").unlink()
    (trial / "seed0" / "proxy_result.json").write_text(json.dumps({**runs[0], "AP": 0.5}))
    again = task(NASFPN_GENOTYPE, trial, "cpu")
    assert again["metrics"]["AP_per_seed"][0] == 0.5
    assert again["metrics"]["AP_per_seed"][1] == pytest.approx(runs[1]["AP"])  # seed 1 trained again, same result
