"""Multi-fidelity search: ASHA rungs and promotions, the runner's rung lines, resume, the proxy's step budgets."""

import json
from types import SimpleNamespace

import pytest

from nasfpn.models.nasfpn import NASFPN_GENOTYPE
from nasfpn.search import proxy as proxy_module
from nasfpn.search.asha import Asha, Rungs
from nasfpn.search.log import LOG_NAME, read_log, rung_results
from nasfpn.search.proxy import ProxySettings, prepare_proxy_task
from nasfpn.search.runner import search
from nasfpn.search.spec import SearchSpec


def test_rung_budgets():
    assert Rungs(10, 90, 3).budgets == [10, 30, 90]
    assert Rungs(10, 100, 3).budgets == [10, 30, 90, 100]
    assert Rungs(10, 200, 4).budgets == [10, 40, 160, 200]
    assert Rungs(50, 50, 3).budgets == [50]
    with pytest.raises(ValueError, match="min_steps"):
        Rungs(100, 10)
    with pytest.raises(ValueError, match="eta"):
        Rungs(10, 100, 1)
    with pytest.raises(ValueError, match="min_steps"):
        SearchSpec(scheduler="asha", min_steps=0, max_steps=10)


def test_promotion_takes_the_top_third_of_each_rung_highest_rung_first():
    asha = Asha(Rungs(1, 9, 3))
    asha.record(0, 0, 0.5)
    asha.record(1, 0, 0.9)
    assert asha.next_promotion() is None  # 2 results: the top 1/3 is empty
    asha.record(2, 0, None)  # a failed trial counts as finished, never promoted
    assert asha.top(0) == [1]
    assert asha.next_promotion() == (1, 1)
    asha.promoted_to(1, 1)
    assert asha.next_promotion() is None
    for t, r in [(3, 0.7), (4, 0.1), (5, 0.8)]:
        asha.record(t, 0, r)
    assert asha.top(0) == [1, 5]  # 6 results: the best 2
    asha.record(1, 1, 0.95)
    asha.record(5, 1, 0.2)  # rung 1 not yet promoted (trial 5 is still to be promoted at rung 0)
    assert asha.next_promotion() == (5, 1)
    asha.promoted_to(5, 1)
    asha.record(5, 1, 0.2)
    asha.record(3, 1, 0.3)
    # Rung 1 has 3 results: its best goes to rung 2 before anything else.
    assert asha.next_promotion() == (1, 2)
    asha.promoted_to(1, 2)
    assert asha.next_promotion() is None
    # Ties go to the earlier trial.
    tie = Asha(Rungs(1, 3, 3))
    for t in (4, 2, 3):
        tie.record(t, 0, 0.5)
    assert tie.next_promotion() == (2, 1)


def asha_spec(**kw) -> SearchSpec:
    options = {
        "controller": "ppo",
        "trials": 15,
        "seed": 3,
        "controller_options": {"batch_size": 4},
        "evaluator": {"kind": "fake", "fail_rate": 0.1},
        "scheduler": "asha",
        "min_steps": 10,
        "max_steps": 90,
        "eta": 3,
    }
    options.update(kw)
    return SearchSpec(**options)


def test_asha_search_logs_one_line_per_trial_per_rung_and_promotes_only_the_top(tmp_path):
    result = search(asha_spec(), tmp_path, backend="inline", log=None)
    records = read_log(tmp_path / LOG_NAME)
    lines = rung_results(records)
    assert {t for t, rung in lines if rung == 0} == set(range(15))
    for (_, rung), r in lines.items():
        assert r["steps"] == [10, 30, 90][rung] and r["split"] == "heldout"
        if r["status"] == "ok":
            assert r["cost"]["steps"] == r["steps"]
    # Every promotion: the trial was in the top 1/eta of the results at its rung at that moment.
    promotions = 0
    for i, r in enumerate(records):
        if r.get("status") == "running" and r.get("rung", 0) > 0:
            promotions += 1
            k = r["rung"] - 1
            before = [x for x in records[:i] if "trial" in x and x.get("rung") == k and x["status"] in ("ok", "failed")]
            ok = sorted(before, key=lambda x: (-(x["reward"] or -1), x["trial"]))
            assert r["trial"] in [x["trial"] for x in ok[: len(before) // 3] if x["status"] == "ok"]
    assert promotions >= 3
    top = [t for t, rung in lines if rung == 2]
    assert top and result.best["rung"] == 2 and result.best["trial"] in top
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [row["steps"] for row in summary["rungs"]] == [10, 30, 90]
    assert summary["rungs"][0]["finished"] == 15 > summary["rungs"][1]["finished"] > summary["rungs"][2]["finished"]
    assert summary["steps_trained"] < summary["steps_if_all_at_max"] / 3
    assert (tmp_path / "rungs.png").is_file() and (tmp_path / "reward.png").is_file()
    assert all(r["steps"] == 90 for r in result.baselines.values())  # baselines at the top budget


def test_an_interrupted_asha_search_resumes_at_the_rung_it_was_at(tmp_path):
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    search(asha_spec(), ref_dir, backend="inline", log=None)
    ref = read_log(ref_dir / LOG_NAME)
    # Killed while the second promotion was training: its "running" line is the last whole line.
    promo = [i for i, r in enumerate(ref) if r.get("status") == "running" and r.get("rung", 0) > 0]
    cut = promo[1] + 1
    cut_dir.mkdir()
    lines = (ref_dir / LOG_NAME).read_text().splitlines(keepends=True)[:cut]
    (cut_dir / LOG_NAME).write_text("".join(lines) + '{"trial": 1')
    (cut_dir / "search.json").write_text((ref_dir / "search.json").read_text())

    search(asha_spec(), cut_dir, backend="inline", resume=True, log=None)
    resumed = read_log(cut_dir / LOG_NAME)
    assert resumed[:cut] == ref[:cut]
    strip = {"started", "finished", "time", "pid", "cost"}

    def same(records):
        return {k: {f: v for f, v in r.items() if f not in strip} for k, r in rung_results(records).items()}

    assert same(resumed) == same(ref)  # every trial at every rung, the same rewards, none twice
    reran = ref[promo[1]]
    assert sum(1 for r in resumed if r.get("trial") == reran["trial"] and r.get("rung") == reran["rung"]) == 2


def test_proxy_rungs_continue_from_the_checkpoint(tmp_path, monkeypatch):
    """A rung stops the max-budget schedule at its steps; a promotion resumes from last.pt."""
    calls = []

    def fake_train(cfg, data, out_dir, resume, device, quiet, check_images, max_steps):
        calls.append({"epochs": cfg.train.epochs, "resume": resume, "max_steps": max_steps, "val": data.val_ann})
        (out_dir / "last.pt").parent.mkdir(parents=True, exist_ok=True)
        (out_dir / "last.pt").write_text("weights")
        (out_dir / "best.pt").write_text("weights")
        return SimpleNamespace(
            status="max_steps", message="", last_metrics={"AP": max_steps / 1000}, wall_time=1.0, steps=max_steps
        )

    monkeypatch.setattr(proxy_module, "train", fake_train)
    settings = ProxySettings(image_size=128, width=16, head_convs=1, batch_size=4, max_steps=90)
    task = prepare_proxy_task(tmp_path, settings, data="synthetic", synthetic_images=20, synthetic_size=64)
    # 16 training images with boxes, 4 a step: 4 steps an epoch, 90 steps in 23 epochs.
    assert task.epochs_for(90) == 23 and task.config(NASFPN_GENOTYPE).train.epochs == 23
    trial = tmp_path / "trial"
    first = task(NASFPN_GENOTYPE, trial, "cpu", steps=10)
    assert first["reward"] == 0.01 and first["cost"]["steps"] == 10 and not first["cost"]["resumed"]
    assert (trial / "last.pt").is_file() and not (trial / "best.pt").exists()  # kept for a promotion
    second = task(NASFPN_GENOTYPE, trial, "cpu", steps=30)
    assert second["cost"]["resumed"] and second["reward"] == 0.03
    again = task(NASFPN_GENOTYPE, trial, "cpu", steps=30)  # a rung already finished is not trained again
    assert again["reward"] == 0.03 and len(calls) == 2
    task(NASFPN_GENOTYPE, trial, "cpu", steps=90)
    assert not (trial / "last.pt").exists()  # the top rung: nothing left to promote to
    assert [c["max_steps"] for c in calls] == [10, 30, 90] and [c["resume"] for c in calls] == [False, True, True]
    assert {c["epochs"] for c in calls} == {23}  # one schedule for every rung
    with pytest.raises(ValueError, match="max_steps"):
        prepare_proxy_task(tmp_path / "b", ProxySettings(), data="synthetic", synthetic_images=10)(
            NASFPN_GENOTYPE, tmp_path / "b" / "t", "cpu", steps=10
        )
