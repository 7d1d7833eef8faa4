"""Proxy training with the EMA of the weights: the setting reaches the trainer, the rung checkpoint
holds the average, and two rungs resumed from last.pt train exactly the one uninterrupted run."""

import pytest
import torch

from nasfpn.models.nasfpn import FPN_CELLS_GENOTYPE
from nasfpn.search.proxy import ProxySettings, prepare_proxy_task
from nasfpn.search.spec import build_evaluator, evaluator_spec

TINY = {"image_size": 128, "width": 8, "head_convs": 1, "batch_size": 4, "warmup_iters": 2, "max_steps": 4}


def test_proxy_ema_settings_reach_the_config_and_survive_the_search_spec(tmp_path):
    settings = ProxySettings(**TINY, ema=0.9, ema_tau=3.0)
    task = prepare_proxy_task(tmp_path, settings, data="synthetic", synthetic_images=10, synthetic_size=64)
    cfg = task.config(FPN_CELLS_GENOTYPE)
    assert (cfg.train.ema, cfg.train.ema_tau) == (0.9, 3.0)
    assert build_evaluator(evaluator_spec(task)).settings == settings
    assert task.config(FPN_CELLS_GENOTYPE).train.ema == 0.9
    plain = prepare_proxy_task(tmp_path, ProxySettings(**TINY), data="synthetic", synthetic_images=10)
    assert plain.config(FPN_CELLS_GENOTYPE).train.ema == 0.0
    with pytest.raises(ValueError, match="ema"):
        ProxySettings(ema=1.0)
    with pytest.raises(ValueError, match="ema_tau"):
        ProxySettings(ema=0.9, ema_tau=-1)


def test_two_ema_rungs_resumed_equal_one_run(tmp_path):
    torch.set_num_threads(1)
    settings = ProxySettings(**TINY, ema=0.8, ema_tau=1.0)
    task = prepare_proxy_task(
        tmp_path, settings, data="synthetic", synthetic_images=12, synthetic_size=64, keep_weights=True
    )
    rungs, whole = tmp_path / "rungs", tmp_path / "whole"
    first = task(FPN_CELLS_GENOTYPE, rungs, "cpu", steps=2)
    assert not first["cost"]["resumed"]
    mid = torch.load(rungs / "last.pt", map_location="cpu", weights_only=False)
    assert mid["ema"]["updates"] == 2  # the average goes on from the rung's checkpoint
    assert any(not torch.equal(v, mid["ema"]["train_model"][k]) for k, v in mid["model"].items())
    second = task(FPN_CELLS_GENOTYPE, rungs, "cpu", steps=4)
    assert second["cost"]["resumed"]
    once = task(FPN_CELLS_GENOTYPE, whole, "cpu", steps=4)
    assert second["metrics"] == once["metrics"]
    a = torch.load(rungs / "last.pt", map_location="cpu", weights_only=False)
    b = torch.load(whole / "last.pt", map_location="cpu", weights_only=False)
    assert a["ema"]["updates"] == b["ema"]["updates"] == 4
    for part in ("model", "train_model"):
        sa = a["model"] if part == "model" else a["ema"]["train_model"]
        sb = b["model"] if part == "model" else b["ema"]["train_model"]
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part


def test_the_command_line_passes_proxy_ema_to_the_search(tmp_path, monkeypatch):
    from nasfpn import cli
    from nasfpn.search import runner

    seen = {}

    def fake_search(spec, out, **kw):
        seen["settings"] = spec.evaluator["settings"]
        raise SystemExit(0)

    monkeypatch.setattr(runner, "search", fake_search)
    args = ["search", "--data", "synthetic", "--synthetic-images", "10", "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        cli.main([*args, "--scheduler", "asha", "--min-steps", "2", "--max-steps", "6", "--proxy-ema", "0.97"])
    assert seen["settings"]["ema"] == 0.97 and seen["settings"]["ema_tau"] == 20.0
    assert seen["settings"]["max_steps"] == 6
    with pytest.raises(SystemExit):
        cli.main([*args, "--proxy-ema-tau", "5"])
    assert seen["settings"]["ema"] == 0.0 and seen["settings"]["ema_tau"] == 5.0
