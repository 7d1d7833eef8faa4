"""The search runner: trial log, failures, resume after a kill, worker processes, Ray."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nasfpn.core.config import config_to_dict
from nasfpn.core.presets import get_config
from nasfpn.models.nasfpn import parse_genotype
from nasfpn.search.log import LOG_NAME, SNAPSHOT_NAME, read_log, trial_results
from nasfpn.search.proxy import FakeEvaluator
from nasfpn.search.runner import run_search, search
from nasfpn.search.space import NASFPN_PAPER
from nasfpn.search.spec import SearchSpec

ROOT = Path(__file__).resolve().parents[1]


def fake_spec(**kw) -> SearchSpec:
    options = {
        "controller": "ppo",
        "trials": 12,
        "seed": 1,
        "controller_options": {"batch_size": 4},
        "evaluator": {"kind": "fake", "fail_rate": 0.15},
    }
    options.update(kw)
    return SearchSpec(**options)


def per_trial(records):
    return [(r["trial"], r["genotype"], r["status"], r["reward"]) for r in trial_results(records)]


def assert_each_trial_once(records, n):
    finals = [r["trial"] for r in records if "trial" in r and r["status"] in ("ok", "failed", "cached")]
    assert sorted(finals) == list(range(n))


def test_inline_search_logs_failures_and_writes_outputs(tmp_path):
    result = search(fake_spec(), tmp_path, backend="inline", log=None)
    records = read_log(tmp_path / LOG_NAME)
    assert_each_trial_once(records, 12)
    statuses = {r["status"] for r in result.results}
    assert "failed" in statuses and "ok" in statuses
    for r in result.results:
        if r["status"] == "failed":
            assert r["reward"] is None and "simulated" in r["error"]
        else:
            assert r["cost"]["wall_s"] >= 0 and r["started"] <= r["finished"]
    assert result.best["status"] in ("ok", "cached")
    assert result.best["reward"] == max(r["reward"] for r in result.results if r["reward"] is not None)
    assert set(result.baselines) == {"nasfpn", "fpn_cells"}
    assert result.baselines["nasfpn"]["reward"] > result.baselines["fpn_cells"]["reward"]

    for name in (
        "best.json",
        "best.txt",
        "best_config.yaml",
        "summary.json",
        "reward.png",
        "unique.png",
        "best_cell.png",
    ):
        assert (tmp_path / name).is_file(), name
    best = json.loads((tmp_path / "best.json").read_text())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["space_size"] == 247_210_809_753_600_000 and summary["trials_finished"] == 12
    # The full-size config is accepted as it is by the config loader and builds the best pyramid.
    cfg = get_config(str(tmp_path / "best_config.yaml"))
    assert parse_genotype(cfg.model.neck.genotype).to_string() == best["node_genotype"]
    assert config_to_dict(cfg)["model"]["backbone"]["depth"] == 50 and cfg.model.neck.stacks == 7

    with pytest.raises(ValueError, match="resume"):
        search(fake_spec(), tmp_path, backend="inline", log=None)


def test_repeated_architectures_reuse_their_reward(tmp_path):
    class Repeater:
        kind = "random"

        def __init__(self):
            self.n = 0

        def propose(self):
            self.n += 1
            return NASFPN_PAPER

        def observe(self, g, r):
            pass

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, s):
            self.n = s["n"]

    result = run_search(Repeater(), FakeEvaluator(), tmp_path, 3, backend="inline", log=None)
    assert [r["status"] for r in result.results] == ["ok", "cached", "cached"]
    assert {r["reward"] for r in result.results} == {result.results[0]["reward"]}
    assert result.results[2]["source_trial"] == 0


def test_resume_replays_the_log_and_reruns_the_trial_in_flight(tmp_path):
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    search(fake_spec(), ref_dir, backend="inline", log=None)
    ref = read_log(ref_dir / LOG_NAME)

    # A search killed while trial 7 was running: the log stops after its "running" line, with
    # half a line written, and no controller snapshot yet (so everything is replayed).
    cut = next(i for i, r in enumerate(ref) if r.get("trial") == 7 and r["status"] == "running") + 1
    cut_dir.mkdir()
    lines = (ref_dir / LOG_NAME).read_text().splitlines(keepends=True)[:cut]
    (cut_dir / LOG_NAME).write_text("".join(lines) + '{"trial": 7, "sta')
    (cut_dir / "search.json").write_text((ref_dir / "search.json").read_text())

    search(fake_spec(), cut_dir, backend="inline", resume=True, log=None)
    resumed = read_log(cut_dir / LOG_NAME)
    assert_each_trial_once(resumed, 12)
    assert per_trial(resumed) == per_trial(ref)
    assert resumed[:cut] == ref[:cut]

    # Asking for more trials later extends the same search.
    search(fake_spec(trials=14), cut_dir, backend="inline", resume=True, log=None)
    assert_each_trial_once(read_log(cut_dir / LOG_NAME), 14)
    with pytest.raises(ValueError, match="seed"):
        search(fake_spec(trials=14, seed=5), cut_dir, backend="inline", resume=True, log=None)


_KILL_SCRIPT = """
import sys
from nasfpn.search.runner import search
from nasfpn.search.spec import SearchSpec
spec = SearchSpec(controller="ppo", trials=16, seed=2, controller_options={"batch_size": 4},
                  evaluator={"kind": "fake", "seconds": 0.25, "fail_rate": 0.1}, baselines=False)
search(spec, sys.argv[1], backend="inline", resume=True, log=None)
"""


@pytest.mark.slow  # the default suite must stay short on a slow 2-core CPU
def test_sigkill_mid_search_then_resume_loses_nothing(tmp_path):
    spec = SearchSpec(
        controller="ppo",
        trials=16,
        seed=2,
        controller_options={"batch_size": 4},
        evaluator={"kind": "fake", "fail_rate": 0.1},
        baselines=False,
    )
    search(spec, tmp_path / "ref", backend="inline", log=None)
    ref = read_log(tmp_path / "ref" / LOG_NAME)

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(out)], env=env)
    deadline = time.time() + 120
    done_before = []
    try:
        while time.time() < deadline:
            done_before = [r for r in read_log(out / LOG_NAME) if r.get("status") in ("ok", "failed", "cached")]
            if len(done_before) >= 6:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert 6 <= len(done_before) < 16, "the search should be killed mid-way"
    assert (out / SNAPSHOT_NAME).is_file()

    kept = read_log(out / LOG_NAME)
    # Resumed with a different evaluator speed: the rewards do not depend on it.
    search(
        SearchSpec(**{**spec.to_dict(), "evaluator": {"kind": "fake", "seconds": 0.25, "fail_rate": 0.1}}),
        out,
        backend="inline",
        resume=True,
        log=None,
    )
    final = read_log(out / LOG_NAME)
    assert final[: len(kept)] == kept  # append-only: nothing rewritten
    assert_each_trial_once(final, 16)
    assert per_trial(final) == per_trial(ref)  # same trials, same rewards as a search never killed


def test_worker_processes_survive_a_crashing_trial(tmp_path):
    spec = fake_spec(trials=8, evaluator={"kind": "fake", "crash_rate": 0.25, "seconds": 0.2}, baselines=False)
    result = search(spec, tmp_path, workers=2, backend="process", log=None)
    assert_each_trial_once(result.records, 8)
    failed = [r for r in result.results if r["status"] == "failed"]
    assert failed and all("worker process died" in r["error"] for r in failed)
    ok = [r for r in result.results if r["status"] == "ok"]
    assert len({r["pid"] for r in ok}) >= 2  # trials ran in parallel workers, replaced after a crash


@pytest.mark.slow  # the default suite must stay short on a slow 2-core CPU
def test_ray_local_two_workers(tmp_path):
    pytest.importorskip("ray")
    spec = fake_spec(
        controller="evolution",
        trials=6,
        controller_options={"population_size": 3, "sample_size": 2},
        evaluator={"kind": "fake", "fail_rate": 0.2, "seconds": 0.5},
        baselines=False,
    )
    result = search(spec, tmp_path, workers=2, backend="ray", ray_address="local", log=None)
    assert_each_trial_once(result.records, 6)
    ok = [r for r in result.results if r["status"] == "ok"]
    failed = [r for r in result.results if r["status"] == "failed"]
    assert ok and all("simulated" in r["error"] for r in failed)
    assert os.getpid() not in {r["pid"] for r in ok}  # trials ran in Ray worker processes
    assert [r["status"] for r in result.records[:2]] == ["running", "running"]  # two trials in flight
