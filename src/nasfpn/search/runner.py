"""Asynchronous, resumable architecture search: a controller, an evaluator, K trials in flight.

``run_search(controller, evaluator, out_dir, trials, ...)`` keeps up to ``workers`` proxy
trials running, feeds each reward to the controller the moment its trial finishes, and asks
the controller for the next genotype. Trials run

- ``backend="process"``: in ``workers`` long-lived worker processes on this machine, one per
  GPU when ``devices`` names GPUs, CPU workers otherwise with the cores split between them
  (``torch.set_num_threads``), so K workers do not oversubscribe the machine;
- ``backend="ray"``: as Ray tasks on a cluster (``ray_address``: ``"auto"``, ``"ray://..."``,
  ``host:port``, or ``"local"`` to start a private local instance); each task asks Ray for
  ``threads`` CPUs and, with GPUs, one GPU. Trial folders are created on the machine that runs
  the trial (same path); the log and everything else stays with the driver;
- ``backend="inline"``: one at a time in this process (debugging, tests).

Worker processes start from a fork server: as with any ``multiprocessing`` code, a script that
runs a search with process workers needs the ``if __name__ == "__main__":`` guard. A worker
whose search process disappears (killed) ends itself within a second.

An evaluator is a picklable callable ``evaluator(genotype, trial_dir, device) -> dict`` with a
float ``"reward"`` and optional ``"metrics"`` and ``"cost"`` dicts (``proxy.ProxyTask``, or
``proxy.FakeEvaluator`` for tests). It receives the node-form ``Genotype`` to build.

Files in ``out_dir``:

``trials.jsonl``
    Append-only log, one JSON object per line. A controller trial has a ``"running"`` line when
    proposed (``trial``, ``genotype`` in paper form, ``node_genotype``, ``time``) and one result
    line: ``"ok"`` (``reward``, ``metrics``, ``cost`` with ``wall_s`` and the evaluator's params /
    FLOPs, ``started``, ``finished``), ``"failed"`` (``error``; an exception, a non-finite
    reward, or a worker process that died, e.g. killed for memory) or ``"cached"`` (the same
    network, by ``PaperGenotype.canonical``, already finished: its reward is reused,
    ``source_trial`` names it, nothing is trained). Baseline genotypes (``baselines=``) get lines
    with a ``baseline`` name instead of a trial id and are never shown to the controller.
``controller.pt``
    Controller snapshot: its ``state_dict`` after the first ``events`` lines of the log.

Failed trials. A failed trial is logged with ``reward: null`` and shown to the controller with
reward 0 (an architecture that cannot be trained is a bad one, and PPO's batches and
evolution's population keep their rhythm); it is excluded from the best genotype and from the
"ok" statistics. The search goes on.

Resume (``resume=True``). The log is read back (a line cut short by a kill is dropped), the
controller snapshot is loaded and the log lines written after it are replayed into the
controller: a ``running`` line is replayed by calling ``propose()`` again, which must give the
logged genotype (controllers are deterministic), and a result line by ``observe()``. So every
completed trial is kept and none runs twice. Trials that were running at the kill are run
again with the same trial id and genotype (their training restarts from its own checkpoint
where the evaluator supports it); the controller is not asked again for them.

With several workers the order in which results arrive depends on timing, so two searches with
the same seed can differ; a resumed search continues exactly the run it resumes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nasfpn.core.fileio import atomic_path, write_json_atomic, write_text_atomic
from nasfpn.models.nasfpn import Genotype
from nasfpn.search.controllers import Controller
from nasfpn.search.executors import build_executor
from nasfpn.search.space import PaperGenotype
from nasfpn.search.spec import SPEC_NAME, SearchSpec

LOG_NAME = "trials.jsonl"
SNAPSHOT_NAME = "controller.pt"
RESULT_STATUSES = ("ok", "failed", "cached")


# --------------------------------------------------------------------------- the log
def read_log(path: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """The records of a trial log. A last line cut short by a kill is dropped (and, with
    ``repair``, cut from the file so appends start on a clean line)."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    records: list[dict[str, Any]] = []
    good = 0
    for line in data.splitlines(keepends=True):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("unterminated line")
            records.append(json.loads(line))
        except ValueError:
            break
        good += len(line)
    if repair and good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return records


def _append(path: Path, record: dict[str, Any]) -> None:
    line = json.dumps(record, separators=(",", ":")) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _save_snapshot(path: Path, controller: Controller, events: int) -> None:
    with atomic_path(path) as tmp:
        torch.save({"events": events, "kind": controller.kind, "controller": controller.state_dict()}, tmp)


def controller_reward(record: dict[str, Any]) -> float:
    """The reward a controller is shown for a result line (failed trials: 0)."""
    return float(record["reward"]) if record.get("reward") is not None else 0.0


# --------------------------------------------------------------------------- the search
@dataclass
class SearchResult:
    out_dir: Path
    records: list[dict[str, Any]]
    best: dict[str, Any] | None
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def results(self) -> list[dict[str, Any]]:
        """Final lines of controller trials, in trial order."""
        return trial_results(self.records)


def trial_results(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    final = {r["trial"]: r for r in records if "trial" in r and r.get("status") in RESULT_STATUSES}
    return [final[k] for k in sorted(final)]


def baseline_results(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["baseline"]: r for r in records if "baseline" in r and r.get("status") in RESULT_STATUSES}


def best_result(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The finished trial with the highest reward (the earliest on a tie)."""
    ok = [r for r in trial_results(records) if r["status"] in ("ok", "cached")]
    return max(ok, key=lambda r: (r["reward"], -r["trial"])) if ok else None


def _replay(controller: Controller, records: list[dict[str, Any]]) -> None:
    for r in records:
        if "trial" not in r:
            continue
        if r["status"] == "running":
            g = controller.propose()
            if g.to_string() != r["genotype"]:
                raise RuntimeError(f"resume: replaying trial {r['trial']}, the controller proposed {g.to_string()!r} "
                                   f"but the log has {r['genotype']!r}; was the search restarted with other "
                                   "controller settings or seed?")
        elif r["status"] in RESULT_STATUSES:
            controller.observe(PaperGenotype.from_string(r["genotype"]), controller_reward(r))


def _progress(text: str) -> None:
    print(text, flush=True)


def run_search(controller: Controller, evaluator: Callable[..., dict], out_dir: str | Path, trials: int,
               workers: int = 1, backend: str = "process", ray_address: str | None = None,
               threads: int | None = None, devices: list[str] | None = None, resume: bool = False,
               reuse: bool = True, baselines: dict[str, Genotype] | None = None,
               log: Callable[[str], None] | None = _progress, executor=None) -> SearchResult:
    """Run (or, with ``resume``, continue) a search of ``trials`` controller trials; see the
    module docstring. Returns every log record, the best trial and the baseline results."""
    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path, snap_path = out_dir / LOG_NAME, out_dir / SNAPSHOT_NAME
    say = log or (lambda s: None)

    records = read_log(log_path, repair=True)
    if records and not resume:
        raise ValueError(f"{log_path} already holds a search; pass resume=True (--resume) to continue it, "
                         "or choose another output folder")
    events = 0
    if snap_path.is_file() and records:
        snap = torch.load(snap_path, weights_only=True)
        if snap["kind"] != controller.kind:
            raise ValueError(f"{snap_path} belongs to a {snap['kind']!r} controller, not {controller.kind!r}")
        events = min(int(snap["events"]), len(records))
        controller.load_state_dict(snap["controller"])
    _replay(controller, records[events:])

    proposed: dict[int, dict] = {r["trial"]: r for r in records if "trial" in r and r["status"] == "running"}
    finished: dict[int, dict] = {r["trial"]: r for r in trial_results(records)}
    base_done = baseline_results(records)
    cache: dict[str, dict] = {}
    for r in finished.values():
        if r["status"] == "ok":
            cache.setdefault(PaperGenotype.from_string(r["genotype"]).canonical().to_string(), r)
    todo: list[tuple[Any, str]] = []  # (key, node genotype) to run before asking the controller
    for name, g in (baselines or {}).items():
        if name not in base_done:
            todo.append((("baseline", name), g.to_string()))
    rerun = sorted(set(proposed) - set(finished))
    if rerun:
        say(f"resume: running again trial(s) {', '.join(map(str, rerun))}, in flight when the search stopped")
    todo += [(("trial", t), proposed[t]["node_genotype"]) for t in rerun]
    if records:
        say(f"resume: {len(finished)} finished trial(s), {len(base_done)} baseline(s) kept from {log_path}")

    n_events = len(records)

    def write(record: dict[str, Any], snapshot: bool) -> None:
        nonlocal n_events
        _append(log_path, record)
        records.append(record)
        n_events += 1
        if snapshot:
            _save_snapshot(snap_path, controller, n_events)

    def best_reward() -> float | None:
        b = best_result(records)
        return b["reward"] if b else None

    executor = executor or build_executor(evaluator, backend, workers, ray_address, threads, devices)
    running: dict[Any, float] = {}
    next_trial = max(proposed, default=-1) + 1
    try:
        while True:
            while len(running) < executor.capacity and (todo or next_trial < trials):
                if todo:
                    key, text = todo.pop(0)
                else:
                    g = controller.propose()
                    tid = next_trial
                    next_trial += 1
                    text = g.lower().to_string()
                    now = round(time.time(), 3)
                    proposed[tid] = {"trial": tid, "status": "running", "genotype": g.to_string(),
                                     "node_genotype": text, "time": now}
                    write(proposed[tid], snapshot=True)
                    hit = cache.get(g.canonical().to_string()) if reuse else None
                    if hit is not None:
                        rec = {"trial": tid, "status": "cached", "genotype": g.to_string(), "node_genotype": text,
                               "reward": hit["reward"], "metrics": hit.get("metrics", {}), "cost": {**hit.get("cost", {}), "wall_s": 0.0},
                               "source_trial": hit["trial"], "started": now, "finished": now}
                        controller.observe(g, rec["reward"])
                        write(rec, snapshot=True)
                        say(f"trial {tid:4d} cached  reward {rec['reward']:.4f} (= trial {hit['trial']})  {g}")
                        continue
                    key = ("trial", tid)
                kind, name = key
                trial_dir = out_dir / "trials" / (f"{name:04d}" if kind == "trial" else f"baseline_{name}")
                executor.submit(key, text, str(trial_dir))
                running[key] = time.time()
            if not running:
                break
            for key, result in executor.wait(timeout=None):
                running.pop(key, None)
                kind, name = key
                if kind == "baseline":
                    rec = {"baseline": name, "genotype": baselines[name].to_string(), **result}
                    rec.setdefault("reward", None)
                    write(rec, snapshot=False)
                    shown = f"{rec['reward']:.4f}" if rec["status"] == "ok" else rec.get("error", "")
                    say(f"baseline {name}: {rec['status']} {shown}")
                    continue
                prop = proposed[name]
                g = PaperGenotype.from_string(prop["genotype"])
                rec = {"trial": name, "genotype": prop["genotype"], "node_genotype": prop["node_genotype"], **result}
                if rec["status"] != "ok":
                    rec["reward"] = None
                controller.observe(g, controller_reward(rec))
                write(rec, snapshot=True)
                if rec["status"] == "ok":
                    cache.setdefault(g.canonical().to_string(), rec)
                    best = best_reward()
                    say(f"trial {name:4d} ok      reward {rec['reward']:.4f} (best {best:.4f})  "
                        f"{rec['cost'].get('wall_s', 0):.0f}s  {g}")
                else:
                    say(f"trial {name:4d} failed  {rec.get('error', '')}")
    finally:
        executor.close()
    return SearchResult(out_dir, records, best_result(records), baseline_results(records), time.time() - t0)


# --------------------------------------------------------------------------- a whole search
def search(spec: SearchSpec, out_dir: str | Path, workers: int = 1, backend: str = "process",
           ray_address: str | None = None, resume: bool = False, devices: list[str] | None = None,
           threads: int | None = None, log: Callable[[str], None] | None = _progress) -> SearchResult:
    """Run the search ``spec`` describes in ``out_dir`` and write its outputs (``write_outputs``).
    With ``resume``, ``spec`` must match the saved ``search.json`` except for ``trials``."""
    out_dir = Path(out_dir)
    spec_path = out_dir / SPEC_NAME
    if resume and spec_path.is_file():
        saved = SearchSpec.from_file(spec_path).to_dict()
        differ = sorted(k for k, v in spec.to_dict().items() if k != "trials" and saved.get(k) != v)
        if differ:
            raise ValueError(f"resume: {', '.join(differ)} differ from {spec_path}; a search resumes with its own settings")
    elif not resume and (out_dir / LOG_NAME).is_file():
        raise ValueError(f"{out_dir} already holds a search; pass --resume to continue it, or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(spec.to_dict(), spec_path)
    baselines = None
    if spec.baselines:
        from nasfpn.models.nasfpn import FPN_GENOTYPE, NASFPN_GENOTYPE

        baselines = {"nasfpn": NASFPN_GENOTYPE, "fpn": FPN_GENOTYPE}
    result = run_search(spec.build_controller(), spec.build_evaluator(), out_dir, spec.trials, workers, backend,
                        ray_address, threads, devices, resume, spec.reuse, baselines, log)
    write_outputs(out_dir, spec, result.records)
    return result


def summarize(records: list[dict[str, Any]], spec: SearchSpec | None = None) -> dict[str, Any]:
    """Counts, best trial, baselines and timings of a search log."""
    from nasfpn.search.plots import unique_counts

    results = trial_results(records)
    ok = [r for r in results if r["status"] == "ok"]
    walls = sorted(r["cost"]["wall_s"] for r in ok if "wall_s" in r.get("cost", {}))
    best = best_result(records)
    times = [r[k] for r in records for k in ("time", "started", "finished") if r.get(k)]
    unique = unique_counts(records)
    summary: dict[str, Any] = {
        "controller": spec.controller if spec else None,
        "trials_finished": len(results),
        "ok": len(ok),
        "failed": sum(r["status"] == "failed" for r in results),
        "cached": sum(r["status"] == "cached" for r in results),
        "unique_architectures": unique[-1] if unique else 0,
        "best": None if best is None else {k: best.get(k) for k in ("trial", "reward", "genotype", "node_genotype", "metrics", "cost")},
        "baselines": {name: r.get("reward") for name, r in baseline_results(records).items()},
        "trial_wall_s": {"mean": sum(walls) / len(walls), "median": walls[len(walls) // 2], "max": walls[-1]} if walls else None,
        "span_s": round(max(times) - min(times), 1) if times else 0.0,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if spec is not None:
        summary["space_size"] = spec.space().size()
    return summary


def write_outputs(out_dir: str | Path, spec: SearchSpec, records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """``best.json``, ``best.txt``, ``best_config.yaml``, ``summary.json`` and the plots
    (``reward.png``, ``unique.png``, ``best_cell.png``) of the search in ``out_dir``."""
    from nasfpn.core.config import config_to_yaml
    from nasfpn.search import plots
    from nasfpn.search.proxy import full_size_config

    out_dir = Path(out_dir)
    records = read_log(out_dir / LOG_NAME) if records is None else records
    summary = summarize(records, spec)
    write_text_atomic(path=out_dir / "summary.json", text=json.dumps(summary, indent=1))
    baselines = {k: v for k, v in summary["baselines"].items() if v is not None}
    plots.plot_rewards(records, out_dir / "reward.png", f"{spec.controller}: reward over trials", baselines)
    plots.plot_unique({spec.controller: records}, out_dir / "unique.png")
    best = best_result(records)
    if best is None:
        return summary
    paper = PaperGenotype.from_string(best["genotype"])
    node = Genotype.from_string(best["node_genotype"])
    write_text_atomic(path=out_dir / "best.json", text=json.dumps({
        "trial": best["trial"], "reward": best["reward"], "metrics": best.get("metrics", {}), "cost": best.get("cost", {}),
        "genotype": paper.to_string(), "genotype_json": paper.to_dict(),
        "node_genotype": node.to_string(), "node_genotype_json": json.loads(node.to_json()),
    }, indent=1))
    base_text = "".join(f"{name:>8}: {value:.4f}\n" for name, value in sorted(baselines.items()))
    write_text_atomic(path=out_dir / "best.txt", text=
                 f"best trial {best['trial']} of {summary['trials_finished']} ({spec.controller}), reward {best['reward']:.4f}\n"
                 f"paper form: {paper.to_string()}\nnode form:  {node.to_string()}\n"
                 + (f"baselines on the same proxy task:\n{base_text}" if base_text else ""))
    cfg = full_size_config(node, spec.full_preset)
    write_text_atomic(path=out_dir / "best_config.yaml", text=f"# {spec.full_preset} with the pyramid found by `nasfpn search` "
                 f"(trial {best['trial']}, proxy reward {best['reward']:.4f}).\n" + config_to_yaml(cfg))
    plots.plot_cell_graph(paper, out_dir / "best_cell.png", f"best of {spec.controller} (trial {best['trial']}, "
                          f"reward {best['reward']:.3f})\n{paper.to_string()}")
    return summary
