"""Asynchronous, resumable architecture search: a controller, an evaluator, K trials in flight.

``run_search(controller, evaluator, out_dir, trials, ...)`` keeps up to ``workers`` trials
running (in worker processes, on Ray or inline: ``executors``), feeds each reward to the
controller the moment its trial finishes, and asks the controller for the next genotype. Every
proposal and result is a line of the trial log (``log``) before anything else happens, so a
search killed at any point resumes (``resume=True``) with every completed trial kept and none
run twice: the controller is brought back by ``TrialLog.restore``, and trials that were running
at the kill are run again with the same trial id and genotype (their training restarts from its
own checkpoint where the evaluator supports it) without asking the controller again.

A network proposed again (same ``PaperGenotype.canonical``) reuses the reward of its first
finished trial (a ``"cached"`` line) unless ``reuse=False``. A failed trial does not stop the
search. Baseline genotypes (``baselines=``) run first and are never shown to the controller.

``search(spec, out_dir, ...)`` runs the search a ``SearchSpec`` describes, saved as
``search.json``, and writes its outputs (``outputs.write_outputs``).

With several workers the order in which results arrive depends on timing, so two searches with
the same seed can differ; a resumed search continues exactly the run it resumes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nasfpn.core.fileio import write_json_atomic
from nasfpn.models.nasfpn import FPN_CELLS_GENOTYPE, NASFPN_GENOTYPE, Genotype
from nasfpn.search.controllers import Controller
from nasfpn.search.executors import Executor, build_executor
from nasfpn.search.log import LOG_NAME, TrialLog, baseline_results, best_result, controller_reward, trial_results
from nasfpn.search.outputs import write_outputs
from nasfpn.search.space import PaperGenotype
from nasfpn.search.spec import SPEC_NAME, SearchSpec

Key = tuple[str, Any]
"""What runs on an executor: ``("trial", trial id)`` or ``("baseline", name)``."""


@dataclass
class SearchResult:
    """A finished ``run_search``: every log record, the best trial and the baseline results."""

    out_dir: Path
    records: list[dict[str, Any]]
    best: dict[str, Any] | None
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def results(self) -> list[dict[str, Any]]:
        """Final lines of controller trials, in trial order."""
        return trial_results(self.records)


def _progress(text: str) -> None:
    print(text, flush=True)


def _silent(text: str) -> None:
    pass


# --------------------------------------------------------------------------- the loop's state
@dataclass
class _SearchState:
    """Everything the event loop knows between two events. All of it follows from the log
    (``_resume_state``), so a killed search loses only the trials in flight, which run again."""

    controller: Controller
    log: TrialLog
    baselines: dict[str, Genotype]
    reuse: bool
    say: Callable[[str], None]
    proposed: dict[int, dict[str, Any]]
    """Trial id -> its ``"running"`` line."""
    cache: dict[str, dict[str, Any]]
    """Canonical paper genotype -> the first ``"ok"`` result of that network."""
    todo: list[tuple[Key, str]]
    """(key, node genotype) to run before the controller is asked for more."""
    next_trial: int
    running: set[Key] = field(default_factory=set)


def _resume_state(
    controller: Controller, log: TrialLog, baselines: dict[str, Genotype], reuse: bool, say: Callable[[str], None]
) -> _SearchState:
    """The state after the records already in ``log``: baselines not yet evaluated and trials
    that were in flight when the search stopped go first."""
    records = log.records
    proposed = {r["trial"]: r for r in records if "trial" in r and r["status"] == "running"}
    finished = {r["trial"]: r for r in trial_results(records)}
    base_done = baseline_results(records)
    cache: dict[str, dict[str, Any]] = {}
    for r in finished.values():
        if r["status"] == "ok":
            cache.setdefault(PaperGenotype.from_string(r["genotype"]).canonical().to_string(), r)
    todo: list[tuple[Key, str]] = [
        (("baseline", name), g.to_string()) for name, g in baselines.items() if name not in base_done
    ]
    rerun = sorted(set(proposed) - set(finished))
    if rerun:
        say(f"resume: running again trial(s) {', '.join(map(str, rerun))}, in flight when the search stopped")
    todo += [(("trial", t), proposed[t]["node_genotype"]) for t in rerun]
    if records:
        say(f"resume: {len(finished)} finished trial(s), {len(base_done)} baseline(s) kept from {log.path}")
    return _SearchState(
        controller, log, baselines, reuse, say, proposed, cache, todo, next_trial=max(proposed, default=-1) + 1
    )


# --------------------------------------------------------------------------- the events
def _propose(state: _SearchState) -> tuple[Key, str] | None:
    """Ask the controller for the next trial and log it. Returns what to run, or ``None`` when
    the network was trained before (its reward is reused and logged at once)."""
    g = state.controller.propose()
    tid = state.next_trial
    state.next_trial += 1
    text = g.lower().to_string()
    now = round(time.time(), 3)
    state.proposed[tid] = {
        "trial": tid,
        "status": "running",
        "genotype": g.to_string(),
        "node_genotype": text,
        "time": now,
    }
    state.log.append(state.proposed[tid], state.controller)
    hit = state.cache.get(g.canonical().to_string()) if state.reuse else None
    if hit is None:
        return ("trial", tid), text
    rec = {
        "trial": tid,
        "status": "cached",
        "genotype": g.to_string(),
        "node_genotype": text,
        "reward": hit["reward"],
        "metrics": hit.get("metrics", {}),
        "cost": {**hit.get("cost", {}), "wall_s": 0.0},
        "source_trial": hit["trial"],
        "started": now,
        "finished": now,
    }
    state.controller.observe(g, rec["reward"])
    state.log.append(rec, state.controller)
    state.say(f"trial {tid:4d} cached  reward {rec['reward']:.4f} (= trial {hit['trial']})  {g}")
    return None


def _trial_dir(out_dir: Path, key: Key) -> Path:
    kind, name = key
    return out_dir / "trials" / (f"{name:04d}" if kind == "trial" else f"baseline_{name}")


def _finish(state: _SearchState, key: Key, result: dict[str, Any]) -> None:
    """Log the result of a finished trial or baseline; a trial's reward goes to the controller."""
    kind, name = key
    if kind == "baseline":
        rec = {"baseline": name, "genotype": state.baselines[name].to_string(), **result}
        rec.setdefault("reward", None)
        state.log.append(rec)
        shown = f"{rec['reward']:.4f}" if rec["status"] == "ok" else rec.get("error", "")
        state.say(f"baseline {name}: {rec['status']} {shown}")
        return
    prop = state.proposed[name]
    g = PaperGenotype.from_string(prop["genotype"])
    rec = {"trial": name, "genotype": prop["genotype"], "node_genotype": prop["node_genotype"], **result}
    if rec["status"] != "ok":
        rec["reward"] = None
    state.controller.observe(g, controller_reward(rec))
    state.log.append(rec, state.controller)
    if rec["status"] == "ok":
        state.cache.setdefault(g.canonical().to_string(), rec)
        best = best_result(state.log.records) or rec  # never None: this trial just finished ok
        state.say(
            f"trial {name:4d} ok      reward {rec['reward']:.4f} (best {best['reward']:.4f})  "
            f"{rec['cost'].get('wall_s', 0):.0f}s  {g}"
        )
    else:
        state.say(f"trial {name:4d} failed  {rec.get('error', '')}")


# --------------------------------------------------------------------------- the loop
def run_search(
    controller: Controller,
    evaluator: Callable[..., dict],
    out_dir: str | Path,
    trials: int,
    workers: int = 1,
    backend: str = "process",
    ray_address: str | None = None,
    threads: int | None = None,
    devices: list[str] | None = None,
    resume: bool = False,
    reuse: bool = True,
    baselines: dict[str, Genotype] | None = None,
    log: Callable[[str], None] | None = _progress,
    executor: Executor | None = None,
) -> SearchResult:
    """Run (or, with ``resume``, continue) a search of ``trials`` controller trials; see the
    module docstring. Returns every log record, the best trial and the baseline results."""
    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trial_log = TrialLog(out_dir)
    if trial_log.records and not resume:
        raise ValueError(
            f"{trial_log.path} already holds a search; pass resume=True (--resume) to continue it, "
            "or choose another output folder"
        )
    trial_log.restore(controller)
    state = _resume_state(controller, trial_log, baselines or {}, reuse, log or _silent)

    executor = executor or build_executor(evaluator, backend, workers, ray_address, threads, devices)
    try:
        while True:
            while len(state.running) < executor.capacity and (state.todo or state.next_trial < trials):
                job = state.todo.pop(0) if state.todo else _propose(state)
                if job is None:
                    continue
                key, text = job
                executor.submit(key, text, str(_trial_dir(out_dir, key)))
                state.running.add(key)
            if not state.running:
                break
            for key, result in executor.wait(timeout=None):
                state.running.discard(key)
                _finish(state, key, result)
    finally:
        executor.close()
    records = trial_log.records
    return SearchResult(out_dir, records, best_result(records), baseline_results(records), time.time() - t0)


# --------------------------------------------------------------------------- a whole search
def search(
    spec: SearchSpec,
    out_dir: str | Path,
    workers: int = 1,
    backend: str = "process",
    ray_address: str | None = None,
    resume: bool = False,
    devices: list[str] | None = None,
    threads: int | None = None,
    log: Callable[[str], None] | None = _progress,
) -> SearchResult:
    """Run the search ``spec`` describes in ``out_dir`` and write its outputs (``write_outputs``).
    With ``resume``, ``spec`` must match the saved ``search.json`` except for ``trials``."""
    out_dir = Path(out_dir)
    spec_path = out_dir / SPEC_NAME
    if resume and spec_path.is_file():
        saved = SearchSpec.from_file(spec_path).to_dict()
        differ = sorted(k for k, v in spec.to_dict().items() if k != "trials" and saved.get(k) != v)
        if differ:
            raise ValueError(
                f"resume: {', '.join(differ)} differ from {spec_path}; a search resumes with its own settings"
            )
    elif not resume and (out_dir / LOG_NAME).is_file():
        raise ValueError(f"{out_dir} already holds a search; pass --resume to continue it, or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(spec.to_dict(), spec_path)
    baselines = {"nasfpn": NASFPN_GENOTYPE, "fpn_cells": FPN_CELLS_GENOTYPE} if spec.baselines else None
    result = run_search(
        spec.build_controller(),
        spec.build_evaluator(),
        out_dir,
        spec.trials,
        workers,
        backend,
        ray_address,
        threads,
        devices,
        resume,
        spec.reuse,
        baselines,
        log,
    )
    write_outputs(out_dir, spec, result.records)
    return result
