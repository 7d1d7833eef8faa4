"""Accuracy and cost: FLOPs / latency constraints (rejected before training) and the MnasNet-style reward."""

import math

import pytest

from nasfpn.core.machine import cpu_name
from nasfpn.search.cost import MNASNET_WEIGHT, CostModel
from nasfpn.search.log import LOG_NAME, controller_reward, read_log, trial_results
from nasfpn.search.runner import search
from nasfpn.search.spec import SearchSpec

TINY = {"model": "nasfpn_tiny", "image_size": 128}
"""A cost model that measures in a fraction of a second: the tiny preset's model at 128 px."""


def test_mnasnet_reward_factor():
    soft = CostModel(target_latency_ms=50.0)
    assert soft.weight == MNASNET_WEIGHT == -0.07
    assert soft.reward_factor({"latency_ms": 50.0}) == 1.0
    # Twice the target costs about 5% of the reward, half of it gains about 5% (MnasNet's soft constraint).
    assert soft.reward_factor({"latency_ms": 100.0}) == pytest.approx(2**-0.07)
    assert soft.reward_factor({"latency_ms": 25.0}) == pytest.approx(2**0.07)
    hard = CostModel(target_latency_ms=50.0, weight=0.0, weight_over=-1.0)
    assert hard.reward_factor({"latency_ms": 25.0}) == 1.0
    assert hard.reward_factor({"latency_ms": 100.0}) == pytest.approx(0.5)
    both = CostModel(target_latency_ms=50.0, target_gflops=2.0)
    assert both.reward_factor({"latency_ms": 100.0, "gflops": 4.0}) == pytest.approx(2**-0.14)
    assert CostModel().reward_factor({"latency_ms": 1e9, "gflops": 1e9}) == 1.0
    assert CostModel(max_gflops=1.0).violations({"gflops": 1.2}) == ["1.20 GFLOPs > max 1"]
    assert CostModel(max_gflops=1.0).violations({"gflops": 0.8}) == []
    with pytest.raises(ValueError, match="latency_runs"):
        CostModel(latency_runs=0)


def test_architectures_over_the_flops_limit_are_rejected_before_training(tmp_path):
    # In the tiny model at 128 px: the published NAS-FPN 0.8354 GFLOPs, the FPN genotype 0.8290,
    # the first 4 random trials of seed 0 0.8173 to 0.8266.
    spec = SearchSpec(
        controller="random",
        trials=4,
        seed=0,
        evaluator={"kind": "fake"},
        cost={**TINY, "max_gflops": 0.82},
    )
    result = search(spec, tmp_path, backend="inline", log=None)
    assert {r["status"] for r in result.baselines.values()} == {"rejected"}
    statuses = [r["status"] for r in result.results]
    assert "rejected" in statuses and "ok" in statuses
    for r in trial_results(read_log(tmp_path / LOG_NAME)):
        assert r["cost"]["cost_model"] == "nasfpn_searched_tiny@128"
        if r["status"] == "rejected":
            assert r["cost"]["gflops"] > 0.82 and "GFLOPs > max 0.82" in r["reason"]
            assert r["reward"] is None and controller_reward(r) == 0.0
            assert "cells" not in r["cost"]  # the evaluator never ran: nothing was trained
            assert (tmp_path / "trials" / f"{r['trial']:04d}" / "cost.json").is_file()
        else:
            assert r["cost"]["gflops"] <= 0.82 and r["cost"]["cells"] >= 7
    assert result.best["status"] == "ok"


def test_latency_is_measured_recorded_and_shapes_the_reward(tmp_path):
    spec = SearchSpec(
        controller="random",
        trials=1,
        seed=0,
        evaluator={"kind": "fake"},
        baselines=False,
        cost={**TINY, "target_latency_ms": 10.0, "latency_runs": 3, "latency_warmup": 1},
    )
    result = search(spec, tmp_path, backend="inline", log=None)
    for r in result.results:
        cost = r["cost"]
        assert 0 < cost["latency_ms"] < 10_000 and cost["latency_runs"] == 3
        assert cost["latency_device"] == cpu_name() and cost["latency_threads"] >= 1
        factor = (cost["latency_ms"] / 10.0) ** -0.07
        assert r["metrics"]["reward_factor"] == pytest.approx(factor)
        assert r["reward"] == pytest.approx(r["metrics"]["AP"] * factor)
        assert not math.isclose(r["reward"], r["metrics"]["AP"])
