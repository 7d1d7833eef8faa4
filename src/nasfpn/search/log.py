"""The trial log of a search folder, and what is read out of it.

``trials.jsonl``
    Append-only log, one JSON object per line. A controller trial has a ``"running"`` line when
    proposed (``trial``, ``genotype`` in paper form, ``node_genotype``, ``time``) and one result
    line: ``"ok"`` (``reward``, ``metrics``, ``cost`` with ``wall_s`` and the evaluator's params /
    FLOPs, ``started``, ``finished``), ``"failed"`` (``error``; an exception, a non-finite
    reward, or a worker process that died, e.g. killed for memory) or ``"cached"`` (the same
    network, by ``PaperGenotype.canonical``, already finished: its reward is reused,
    ``source_trial`` names it, nothing is trained). Baseline genotypes get lines with a
    ``baseline`` name instead of a trial id and are never shown to the controller.

    ``"rejected"``: the architecture is over a cost constraint (``cost.CostModel``), ``reason``
    says which; it was measured, not trained.

    Multi-fidelity searches (``asha``): every ``running`` and result line also has ``rung`` and
    ``steps`` (its training budget); a trial has one pair of lines per rung it reached, a
    promotion being a ``running`` line at a higher rung. Only rung-0 lines reach the controller
    (each trial once, at the budget all trials share); the best trial is the best of the highest
    rung reached. ``split``: where a reward was measured (``heldout``: the held-out part of the
    training data); lines with ``final`` instead of ``trial`` are the evaluation of the best
    pyramids on the user's validation set (``split: val``) after the search.
``controller.pt``
    Controller snapshot: its ``state_dict`` after the first ``events`` lines of the log.

Failed trials are logged with ``reward: null`` and shown to the controller with reward 0
(``controller_reward``: an architecture that cannot be trained is a bad one, and PPO's batches
and evolution's population keep their rhythm); they never count as best.

Resume (``TrialLog.restore``): the log is read back (a line cut short by a kill is dropped), the
controller snapshot is loaded and the log lines written after it are replayed into the
controller: a ``running`` line by calling ``propose()`` again, which must give the logged
genotype (controllers are deterministic), a result line by ``observe()``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from nasfpn.core.fileio import atomic_path
from nasfpn.search.controllers import Controller
from nasfpn.search.space import PaperGenotype
from nasfpn.search.spec import SearchSpec

LOG_NAME = "trials.jsonl"
SNAPSHOT_NAME = "controller.pt"
RESULT_STATUSES = ("ok", "failed", "cached", "rejected")


# --------------------------------------------------------------------------- the files
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


class TrialLog:
    """``trials.jsonl`` and ``controller.pt`` of one search folder: the records written so far
    (read back, a cut last line repaired, when the folder holds a search) and appends to both."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / LOG_NAME
        self.snapshot_path = Path(out_dir) / SNAPSHOT_NAME
        self.records = read_log(self.path, repair=True)

    def append(self, record: dict[str, Any], controller: Controller | None = None) -> None:
        """Append ``record`` (on disk before this returns); with ``controller``, also save its
        snapshot as of this line."""
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)
        if controller is not None:
            with atomic_path(self.snapshot_path) as tmp:
                torch.save(
                    {"events": len(self.records), "kind": controller.kind, "controller": controller.state_dict()}, tmp
                )

    def restore(self, controller: Controller) -> None:
        """Bring ``controller`` to the end of the log: load its snapshot, then replay the lines
        written after it."""
        events = 0
        if self.snapshot_path.is_file() and self.records:
            snap = torch.load(self.snapshot_path, weights_only=True)
            if snap["kind"] != controller.kind:
                raise ValueError(
                    f"{self.snapshot_path} belongs to a {snap['kind']!r} controller, not {controller.kind!r}"
                )
            events = min(int(snap["events"]), len(self.records))
            controller.load_state_dict(snap["controller"])
        _replay(controller, self.records[events:])


def _replay(controller: Controller, records: list[dict[str, Any]]) -> None:
    for r in records:
        if "trial" not in r or r.get("rung", 0) > 0:
            continue  # promotions to higher rungs are not the controller's
        if r["status"] == "running":
            g = controller.propose()
            if g.to_string() != r["genotype"]:
                raise RuntimeError(
                    f"resume: replaying trial {r['trial']}, the controller proposed {g.to_string()!r} "
                    f"but the log has {r['genotype']!r}; was the search restarted with other "
                    "controller settings or seed?"
                )
        elif r["status"] in RESULT_STATUSES:
            controller.observe(PaperGenotype.from_string(r["genotype"]), controller_reward(r))


def controller_reward(record: dict[str, Any]) -> float:
    """The reward a controller is shown for a result line (failed trials: 0)."""
    return float(record["reward"]) if record.get("reward") is not None else 0.0


# --------------------------------------------------------------------------- reading the records
def trial_results(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The result line of each finished controller trial, in trial order."""
    final = {r["trial"]: r for r in records if "trial" in r and r.get("status") in RESULT_STATUSES}
    return [final[k] for k in sorted(final)]


def baseline_results(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The result line of each finished baseline, by name."""
    return {r["baseline"]: r for r in records if "baseline" in r and r.get("status") in RESULT_STATUSES}


def best_result(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The finished trial with the highest reward (the earliest on a tie); in a multi-fidelity
    search, of those that reached the highest rung (rewards of different budgets do not compare)."""
    ok = [r for r in trial_results(records) if r["status"] in ("ok", "cached")]
    return max(ok, key=lambda r: (r.get("rung", 0), r["reward"], -r["trial"])) if ok else None


def rung_results(records: list[dict[str, Any]]) -> dict[tuple[int, int], dict[str, Any]]:
    """The result line of each (trial, rung); rung 0 for searches without rungs."""
    return {(r["trial"], r.get("rung", 0)): r for r in records if "trial" in r and r.get("status") in RESULT_STATUSES}


def final_results(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The validation-set result of each pyramid evaluated after the search, by name."""
    return {r["final"]: r for r in records if "final" in r and r.get("status") in RESULT_STATUSES}


def rung_summary(records: list[dict[str, Any]], budgets: list[int]) -> list[dict[str, Any]]:
    """Per rung of a multi-fidelity search: its steps, trials finished, ok, best reward."""
    by_rung = rung_results(records)
    rows = []
    for k, steps in enumerate(budgets):
        lines = [r for (_, rung), r in by_rung.items() if rung == k and r["status"] != "cached"]
        ok = [r for r in lines if r["status"] == "ok"]
        best = max(ok, key=lambda r: r["reward"]) if ok else None
        rows.append(
            {
                "rung": k,
                "steps": steps,
                "finished": len(lines),
                "ok": len(ok),
                "best_reward": best["reward"] if best else None,
                "best_trial": best["trial"] if best else None,
            }
        )
    return rows


def unique_counts(records: list[dict[str, Any]]) -> list[int]:
    """After each proposed trial (in trial order), how many distinct networks were proposed so far
    (by ``PaperGenotype.canonical``)."""
    seen: set[str] = set()
    counts = []
    for r in sorted((r for r in records if "trial" in r and r["status"] == "running"), key=lambda r: r["trial"]):
        seen.add(PaperGenotype.from_string(r["genotype"]).canonical().to_string())
        counts.append(len(seen))
    return counts


def summarize(records: list[dict[str, Any]], spec: SearchSpec | None = None) -> dict[str, Any]:
    """Counts, best trial, baselines and timings of a search log."""
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
        "rejected": sum(r["status"] == "rejected" for r in results),
        "unique_architectures": unique[-1] if unique else 0,
        "best": None
        if best is None
        else {k: best.get(k) for k in ("trial", "reward", "genotype", "node_genotype", "metrics", "cost")},
        "baselines": {name: r.get("reward") for name, r in baseline_results(records).items()},
        "trial_wall_s": {"mean": sum(walls) / len(walls), "median": walls[len(walls) // 2], "max": walls[-1]}
        if walls
        else None,
        "span_s": round(max(times) - min(times), 1) if times else 0.0,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if spec is not None:
        summary["space_size"] = spec.space().size()
        summary["reward_split"] = "heldout"
        if spec.scheduler == "asha":
            budgets = spec.rungs().budgets
            summary["scheduler"] = {"kind": "asha", "eta": spec.eta, "budgets": budgets}
            summary["rungs"] = rung_summary(records, budgets)
            # Steps trained (promotions add their rung's steps only: they continue from a
            # checkpoint) against every trained trial at the top budget.
            lines = [r for r in rung_results(records).values() if r["status"] == "ok"]
            spent = sum(budgets[r["rung"]] - (budgets[r["rung"] - 1] if r["rung"] else 0) for r in lines)
            trained = sum(1 for r in lines if r["rung"] == 0)
            summary["steps_trained"] = spent
            summary["steps_if_all_at_max"] = trained * budgets[-1]
        finals = final_results(records)
        if finals:
            summary["final"] = {
                "split": "val",
                "results": {
                    name: {k: r.get(k) for k in ("reward", "metrics", "genotype", "source_trial", "search_reward")}
                    for name, r in finals.items()
                },
            }
    return summary
