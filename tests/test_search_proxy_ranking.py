"""benchmarks/proxy_ranking.py: the architectures, the resume of a study, and one tiny real study."""

import json

import pytest
import torch

from benchmark_scripts import load_benchmark
from nasfpn.models.nasfpn import FPN_CELLS_GENOTYPE, NASFPN_GENOTYPE


@pytest.fixture(scope="module")
def pr():
    return load_benchmark("proxy_ranking")


def test_architectures_are_fixed_by_the_seed_and_take_command_line_genotypes(pr):
    a = pr.architectures(
        random=3,
        random_seed=5,
        extra=("nasfpn", "sum(P4,P3)->P3; sum(c0,P4)->P4; sum(c1,P5)->P5; sum(c2,P6)->P6; sum(c3,P7)->P7"),
    )
    assert list(a) == ["fpn_cells", "nasfpn", "random_0", "random_1", "random_2", "arg_0", "arg_1"]
    assert a["fpn_cells"] == FPN_CELLS_GENOTYPE and a["arg_0"] == NASFPN_GENOTYPE
    b = pr.architectures(random=3, random_seed=5)
    assert [b[f"random_{k}"] for k in range(3)] == [a[f"random_{k}"] for k in range(3)]
    assert len({a[f"random_{k}"].to_string() for k in range(3)}) == 3
    assert pr.architectures(random=1, random_seed=6)["random_0"] != a["random_0"]


def test_study_correlates_the_means_and_resumes_without_retraining(pr, tmp_path):
    genotypes = pr.architectures(random=3, random_seed=1)
    names = list(genotypes)
    true = {name: 0.1 * i for i, name in enumerate(names)}  # the long run's order: names' order
    calls = []

    def evaluate(genotype, kind, k, run_dir):
        name = run_dir.parent.name  # the folder: <work>/<name>/<kind>_seed<k>
        assert run_dir.name == f"{kind}_seed{k}"
        calls.append((name, kind, k))
        # The proxy swaps the two best architectures and adds a seed term smaller than the gaps.
        i = names.index(name)
        base = true[names[{3: 4, 4: 3}.get(i, i)]] if kind == "proxy" else true[name]
        return {"reward": base + 0.01 * k, "train_s": 1.0}

    out = tmp_path / "study.json"
    meta = {"proxy": "fake", "long": "fake x4"}
    study = pr.run_study(genotypes, evaluate, out, seeds=2, long_seeds=3, meta=meta, say=lambda s: None)
    assert len(calls) == 5 * (2 + 3)
    assert study["complete"] == names
    assert study["spearman"] == pytest.approx(1 - 6 * 2 / (5 * 24))  # one swap: sum d^2 = 2
    assert study["regret"]["pick"] == "random_1" and study["regret"]["long_gap"] == pytest.approx(0.1)
    row = study["table"]["nasfpn"]
    assert row["proxy_mean"] == pytest.approx(0.105) and row["long_mean"] == pytest.approx(0.11)
    assert row["proxy_sd"] == pytest.approx(0.00707, abs=1e-4) and row["long_n"] == 3
    assert study["proxy_seed_sd"] == pytest.approx(row["proxy_sd"])
    saved = json.loads(out.read_text())
    assert saved["spearman"] == study["spearman"] and len(saved["runs"]) == 25
    assert all("cpu" in r and r["cpu_s"] >= 0 for r in saved["runs"].values())
    md = out.with_suffix(".md").read_text()
    assert "| nasfpn | 0.1050 ± 0.0071 (2) | 0.1100 ± 0.0100 (3) | 4 | 4 |" in md and "Spearman" in md

    calls.clear()  # a finished study: nothing to train
    again = pr.run_study(genotypes, evaluate, out, seeds=2, long_seeds=3, meta=meta, say=lambda s: None)
    assert calls == [] and again["spearman"] == study["spearman"]
    # Stopped mid-way: the runs missing from the JSON are trained, the rest kept.
    del saved["runs"]["random_1|long|2"], saved["runs"]["fpn_cells|proxy|0"]
    out.write_text(json.dumps(saved))
    pr.run_study(genotypes, evaluate, out, seeds=2, long_seeds=3, meta=meta, say=lambda s: None)
    assert sorted(calls) == [("fpn_cells", "proxy", 0), ("random_1", "long", 2)]
    # More seeds later: only the new ones; a name whose genotype changed: trained again.
    calls.clear()
    changed = {**genotypes, "random_2": genotypes["random_0"]}
    pr.run_study(changed, evaluate, out, seeds=3, long_seeds=3, meta=meta, say=lambda s: None)
    assert sorted(c for c in calls if c[0] != "random_2") == [(n, "proxy", 2) for n in sorted(names) if n != "random_2"]
    assert sum(c[0] == "random_2" for c in calls) == 6
    with pytest.raises(SystemExit, match="other settings"):
        pr.run_study(genotypes, evaluate, out, seeds=2, long_seeds=3, meta={"proxy": "other"}, say=lambda s: None)


def test_self_ranking_seed_curve_and_the_pick_on_the_untouched_set(pr, tmp_path):
    genotypes = pr.architectures(random=3, random_seed=1)
    names = list(genotypes)  # fpn_cells, nasfpn, random_0..2

    def evaluate(genotype, kind, k, run_dir):
        i = names.index(run_dir.parent.name)
        # Proxy seed 1 reverses the order at a tenth of the scale; seed 0 and the long runs keep it.
        proxy = 0.01 * (len(names) - i) if k == 1 else 0.1 * i
        out = {"reward": (proxy if kind == "proxy" else 0.1 * i) + 0.01 * k}
        if kind == "long":
            out["val_AP"] = 0.05 * i + 0.02 * k  # the untouched set agrees with the long runs
        return out

    out = tmp_path / "study.json"
    study = pr.run_study(genotypes, evaluate, out, seeds=2, long_seeds=3, meta={}, say=lambda s: None)
    assert study["self_rank"]["long"] == pytest.approx(1.0) and study["self_rank"]["proxy"] == pytest.approx(-1.0)
    assert study["proxy_vs_other_long"] == pytest.approx(1.0)  # the proxy means keep the long runs' order
    curve = {c["seeds"]: c["spearman"] for c in study["by_proxy_seeds"]}
    assert curve[1] == pytest.approx(0.0) and curve[2] == pytest.approx(1.0)  # seeds: +1 and -1; their mean: +1
    assert study["spearman_val"]["long"] == pytest.approx(1.0)
    assert study["regret"] == {"pick": "random_2", "long_gap": pytest.approx(0.0)}
    pick = study["untouched"]
    assert pick["found"] == "random_2"  # the highest proxy mean, 0.045 i + 0.025, among the non-baselines
    assert set(pick["tests"]) == {f"{pick['found']} - fpn_cells", f"{pick['found']} - nasfpn"}
    gap = pick["tests"][f"{pick['found']} - fpn_cells"]
    assert gap["mean_diff"] == pytest.approx(0.05 * 4) and gap["n"] == 3
    md = out.with_suffix(".md").read_text()
    assert "untouched set" in md and "| proxy seeds averaged |" in md and "paired by seed" in md

    # A study trained without an untouched set: its kept long runs are scored when one is given.
    saved = json.loads(out.read_text())
    for r in saved["runs"].values():
        r.pop("val_AP", None)
    out.write_text(json.dumps(saved))
    folders = []

    def rescore(run_dir):
        folders.append(run_dir.relative_to(tmp_path / "study").as_posix())
        return None if run_dir.parent.name == "random_2" else {"val_AP": 0.5}

    again = pr.run_study(genotypes, evaluate, out, seeds=2, long_seeds=3, meta={}, say=lambda s: None, rescore=rescore)
    assert sorted(folders) == sorted(f"{n}/long_seed{k}" for n in names for k in range(3))
    assert again["table"]["nasfpn"]["val_mean"] == pytest.approx(0.5) and again["table"]["random_2"]["val_n"] == 0
    assert "untouched" not in again  # not every architecture scored


def test_a_tiny_real_study_trains_through_the_proxy_task_and_resumes(pr, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "ranking.json"
    args = [
        "--out", str(out), "--synthetic-images", "12", "--synthetic-size", "64", "--seeds", "1",
        "--long-factor", "2", "--max-steps", "2", "--rung-steps", "1", "--proxy-width", "8",
        "--proxy-head-convs", "1", "--proxy-batch", "4", "--proxy-warmup", "1", "--proxy-ema", "0.5",
        "--proxy-ema-tau", "1",
    ]  # fmt: skip
    study = pr.main(args)
    assert set(study["runs"]) == {f"{n}|{k}|0" for n in ("fpn_cells", "nasfpn") for k in ("proxy", "long")}
    assert study["spearman"] is None  # two architectures: undefined
    assert all(r["cpu_s"] > 0 and 0 <= r["reward"] <= 1 for r in study["runs"].values())
    assert {r["steps"] for k, r in study["runs"].items() if "|proxy|" in k} == {1}  # the rung
    assert {r["steps"] for k, r in study["runs"].items() if "|long|" in k} == {4}  # 2 x 2 steps
    assert study["meta"]["settings"]["ema"] == 0.5 and "step 1 of a 2-step schedule" in study["meta"]["proxy"]
    assert not list((tmp_path / "ranking").rglob("*.pt"))  # weights deleted
    before = out.read_text()
    pr.main(args)  # resumed: nothing trained again
    assert json.loads(out.read_text())["runs"] == json.loads(before)["runs"]
    # An untouched set (here the held-out file itself): long runs' final weights are scored on it.
    heldout = study["meta"]["data"]["heldout"]
    images = str(tmp_path / "ranking" / "data" / "train")
    scored = pr.main([*args, "--out", str(tmp_path / "scored.json"), "--val-ann", heldout, "--val-images", images])
    for key, r in scored["runs"].items():
        assert ("val_AP" in r) == ("|long|" in key) and 0 <= r.get("val_AP", 0) <= 1
    assert not list((tmp_path / "scored").rglob("*.safetensors"))  # scored, then deleted
    # A wrong untouched set is refused before anything is trained for it.
    bad = [*args, "--out", str(tmp_path / "bad.json")]
    with pytest.raises(SystemExit, match="no such folder"):
        pr.main([*bad, "--val-ann", heldout, "--val-images", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="annotation file missing"):
        pr.main([*bad, "--val-ann", str(tmp_path / "missing.json"), "--val-images", images])
    assert not (tmp_path / "bad.json").exists()
