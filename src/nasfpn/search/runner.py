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
from nasfpn.models.nasfpn import GENOTYPES, Genotype
from nasfpn.search.asha import Asha, Rungs
from nasfpn.search.controllers import Controller
from nasfpn.search.executors import Executor, build_executor
from nasfpn.search.log import (
    LOG_NAME,
    TrialLog,
    baseline_results,
    best_result,
    controller_reward,
    final_results,
    rung_results,
    trial_results,
)
from nasfpn.search.outputs import write_outputs
from nasfpn.search.space import PaperGenotype
from nasfpn.search.spec import SPEC_NAME, SearchSpec

Key = tuple[str, Any]
"""What runs on an executor: ``("trial", trial id)``, ``("baseline", name)`` or ``("final", name)``."""
Job = tuple[Key, str, "int | None"]
"""(key, node genotype, training steps or ``None`` for the evaluator's own budget)."""


@dataclass
class SearchResult:
    """A finished ``run_search``: every log record, the best trial and the baseline results."""

    out_dir: Path
    records: list[dict[str, Any]]
    best: dict[str, Any] | None
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    wall_s: float = 0.0
    finals: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Validation-set results of the best pyramids (``SearchSpec.final``), by name."""

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
    todo: list[Job]
    """What to run before the controller is asked for more."""
    next_trial: int
    asha: Asha | None = None
    """Multi-fidelity bookkeeping; ``None``: every trial runs once at the evaluator's budget."""
    running: set[Key] = field(default_factory=set)

    def budget(self, rung: int) -> int | None:
        return self.asha.rungs.budgets[rung] if self.asha else None


def _resume_state(
    controller: Controller,
    log: TrialLog,
    baselines: dict[str, Genotype],
    reuse: bool,
    say: Callable[[str], None],
    rungs: Rungs | None = None,
) -> _SearchState:
    """The state after the records already in ``log``: baselines not yet evaluated and trials
    that were in flight when the search stopped (at the rung they were at) go first."""
    records = log.records
    proposed: dict[int, dict[str, Any]] = {}
    for r in records:
        if "trial" in r and r["status"] == "running":
            proposed[r["trial"]] = r  # the last one: the rung the trial is at
    done = rung_results(records)
    base_done = baseline_results(records)
    cache: dict[str, dict[str, Any]] = {}
    for (_, rung), r in sorted(done.items()):
        if r["status"] == "ok" and rung == 0:
            cache.setdefault(PaperGenotype.from_string(r["genotype"]).canonical().to_string(), r)
    top = rungs.budgets[-1] if rungs else None
    todo: list[Job] = [
        (("baseline", name), g.to_string(), top) for name, g in baselines.items() if name not in base_done
    ]
    rerun = sorted(t for t, r in proposed.items() if (t, r.get("rung", 0)) not in done)
    if rerun:
        say(f"resume: running again trial(s) {', '.join(map(str, rerun))}, in flight when the search stopped")
    todo += [(("trial", t), proposed[t]["node_genotype"], proposed[t].get("steps")) for t in rerun]
    if records:
        finished = len(trial_results(records))
        say(f"resume: {finished} finished trial(s), {len(base_done)} baseline(s) kept from {log.path}")
    asha = Asha.from_records(rungs, records) if rungs else None
    return _SearchState(
        controller,
        log,
        baselines,
        reuse,
        say,
        proposed,
        cache,
        todo,
        next_trial=max(proposed, default=-1) + 1,
        asha=asha,
    )


# --------------------------------------------------------------------------- the events
def _rung_fields(state: _SearchState, rung: int) -> dict[str, Any]:
    return {"rung": rung, "steps": state.budget(rung)} if state.asha else {}


def _propose(state: _SearchState) -> Job | None:
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
        **_rung_fields(state, 0),
    }
    state.log.append(state.proposed[tid], state.controller)
    hit = state.cache.get(g.canonical().to_string()) if state.reuse else None
    if hit is None:
        return ("trial", tid), text, state.budget(0)
    rec = {
        "trial": tid,
        "status": "cached",
        "genotype": g.to_string(),
        "node_genotype": text,
        **_rung_fields(state, 0),
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


def _promote(state: _SearchState, trial: int, rung: int) -> Job:
    """Log the promotion of ``trial`` to ``rung`` (a ``running`` line); it trains on from its
    checkpoint in the same folder."""
    assert state.asha is not None
    prev = state.proposed[trial]
    line = {
        "trial": trial,
        "status": "running",
        "genotype": prev["genotype"],
        "node_genotype": prev["node_genotype"],
        "time": round(time.time(), 3),
        "promoted": True,
        **_rung_fields(state, rung),
    }
    state.asha.promoted_to(trial, rung)
    state.proposed[trial] = line
    state.log.append(line, state.controller)
    state.say(f"trial {trial:4d} promoted to rung {rung} ({state.budget(rung)} steps)")
    return ("trial", trial), prev["node_genotype"], state.budget(rung)


def _next_job(state: _SearchState, trials: int) -> Job | None:
    """What to start on a free worker: a baseline or an interrupted trial, else a promotion
    (multi-fidelity), else a new trial from the controller; ``None`` when there is nothing."""
    while True:
        if state.todo:
            return state.todo.pop(0)
        if state.asha is not None:
            promotion = state.asha.next_promotion()
            if promotion is not None:
                return _promote(state, *promotion)
        if state.next_trial >= trials:
            return None
        job = _propose(state)
        if job is not None:
            return job


def _trial_dir(out_dir: Path, key: Key) -> Path:
    kind, name = key
    if kind == "final":
        return out_dir / "final" / name
    return out_dir / "trials" / (f"{name:04d}" if kind == "trial" else f"baseline_{name}")


def _finish(state: _SearchState, key: Key, result: dict[str, Any]) -> None:
    """Log the result of a finished trial or baseline; a trial's reward goes to the controller."""
    kind, name = key
    top = _rung_fields(state, len(state.asha.rungs) - 1) if state.asha else {}
    if kind == "baseline":
        rec = {"baseline": name, "genotype": state.baselines[name].to_string(), "split": "heldout", **top, **result}
        rec.setdefault("reward", None)
        state.log.append(rec)
        shown = f"{rec['reward']:.4f}" if rec["status"] == "ok" else rec.get("error", rec.get("reason", ""))
        state.say(f"baseline {name}: {rec['status']} {shown}")
        return
    prop = state.proposed[name]
    rung = prop.get("rung", 0)
    g = PaperGenotype.from_string(prop["genotype"])
    rec = {
        "trial": name,
        "genotype": prop["genotype"],
        "node_genotype": prop["node_genotype"],
        **_rung_fields(state, rung),
        "split": "heldout",
        **result,
    }
    if rec["status"] != "ok":
        rec["reward"] = None
    if rung == 0:  # the controller sees each trial once, at the budget every trial gets
        state.controller.observe(g, controller_reward(rec))
    if state.asha is not None:
        state.asha.record(name, rung, rec["reward"])
    state.log.append(rec, state.controller)
    at = f" rung {rung}" if state.asha else ""
    if rec["status"] == "ok":
        if rung == 0:
            state.cache.setdefault(g.canonical().to_string(), rec)
        best = best_result(state.log.records) or rec  # never None: this trial just finished ok
        state.say(
            f"trial {name:4d} ok{at}  reward {rec['reward']:.4f} (best {best['reward']:.4f})  "
            f"{rec['cost'].get('wall_s', 0):.0f}s  {g}"
        )
    elif rec["status"] == "rejected":
        state.say(f"trial {name:4d} rejected  {rec.get('reason', '')}")
    else:
        state.say(f"trial {name:4d} failed{at}  {rec.get('error', '')}")


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
    rungs: Rungs | None = None,
) -> SearchResult:
    """Run (or, with ``resume``, continue) a search of ``trials`` controller trials; see the
    module docstring. ``rungs``: asynchronous successive halving over these budgets (``asha``;
    ``trials`` new trials start at rung 0). Returns every log record, the best trial and the
    baseline results."""
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
    state = _resume_state(controller, trial_log, baselines or {}, reuse, log or _silent, rungs)

    executor = executor or build_executor(evaluator, backend, workers, ray_address, threads, devices)
    try:
        while True:
            while len(state.running) < executor.capacity:
                job = _next_job(state, trials)
                if job is None:
                    break
                key, text, steps = job
                executor.submit(key, text, str(_trial_dir(out_dir, key)), steps)
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
    baselines = dict(GENOTYPES) if spec.baselines else None
    rungs = spec.rungs() if spec.scheduler == "asha" else None
    evaluator = spec.build_evaluator()
    result = run_search(
        spec.build_controller(),
        evaluator,
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
        rungs=rungs,
    )
    if spec.final:
        final = spec.final
        finals = final_evaluation(
            out_dir,
            evaluator.for_split(final["val_ann"], final.get("val_images")),  # type: ignore[attr-defined]
            result.records,
            int(final.get("top_k", 3)),
            baselines if final.get("baselines", True) else None,
            rungs.budgets[-1] if rungs else None,
            lambda ev: build_executor(ev, backend, workers, ray_address, threads, devices),
            log or _silent,
        )
        result.records = TrialLog(out_dir).records
        result.finals = finals
    if rungs is not None and not spec.evaluator.get("keep_weights", True):
        _drop_checkpoints(out_dir)
    write_outputs(out_dir, spec, result.records)
    return result


def _drop_checkpoints(out_dir: Path) -> None:
    """The checkpoints a multi-fidelity search kept for promotions, once it is over."""
    for path in (out_dir / "trials").rglob("last*.pt"):  # trials/NNNN/ and, with seeds, trials/NNNN/seedK/
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- after the search
def final_evaluation(
    out_dir: Path,
    evaluator: Callable[..., dict],
    records: list[dict[str, Any]],
    top_k: int,
    baselines: dict[str, Genotype] | None,
    steps: int | None,
    make_executor: Callable[[Callable[..., dict]], Executor],
    say: Callable[[str], None] = _silent,
) -> dict[str, dict[str, Any]]:
    """Train the ``top_k`` best distinct pyramids of the search (and ``baselines``) once more at
    the top budget and evaluate them on the validation set ``evaluator`` rewards with: the only
    time that set is used. Each result is a ``final`` line of the log (``split: val``); those
    already there (a resumed search) are kept. Returns them by name."""
    trial_log = TrialLog(out_dir)
    done = final_results(trial_log.records)
    ranked = sorted(
        (r for r in trial_results(records) if r["status"] in ("ok", "cached")),
        key=lambda r: (-r.get("rung", 0), -r["reward"], r["trial"]),
    )
    picks: dict[str, tuple[str, dict[str, Any]]] = {}
    seen: set[str] = set()
    for r in ranked:
        canon = PaperGenotype.from_string(r["genotype"]).canonical().to_string()
        if canon in seen:
            continue
        seen.add(canon)
        picks[f"trial{r['source_trial'] if r['status'] == 'cached' else r['trial']}"] = (r["node_genotype"], r)
        if len(picks) == top_k:
            break
    for name, g in (baselines or {}).items():
        base = baseline_results(records).get(name, {})
        picks[name] = (g.to_string(), {"genotype": g.to_string(), "reward": base.get("reward")})
    todo = [name for name in picks if name not in done]
    if todo:
        say(f"final: {', '.join(todo)} on the validation set")
        executor = make_executor(evaluator)
        try:
            pending = list(todo)
            running: set[str] = set()
            while pending or running:
                while pending and len(running) < executor.capacity:
                    name = pending.pop(0)
                    executor.submit(("final", name), picks[name][0], str(_trial_dir(out_dir, ("final", name))), steps)
                    running.add(name)
                for (_, name), result in executor.wait(timeout=None):
                    running.discard(name)
                    text, source = picks[name]
                    rec = {
                        "final": name,
                        "split": "val",
                        "genotype": source["genotype"],
                        "node_genotype": text,
                        "source_trial": source.get("trial"),
                        "search_reward": source.get("reward"),
                        "steps": steps,
                        **result,
                    }
                    rec.setdefault("reward", None)
                    trial_log.append(rec)
                    shown = f"{rec['reward']:.4f}" if rec["status"] == "ok" else rec.get("error", rec.get("reason"))
                    say(f"final {name}: val {shown}")
        finally:
            executor.close()
    return final_results(trial_log.records)
