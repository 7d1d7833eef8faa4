"""Asynchronous successive halving (ASHA) over the trials of a search.

ASHA (Li et al., "A System for Massively Parallel Hyperparameter Tuning", MLSys 2020): rung ``k``
trains for ``min_steps * eta**k`` steps (the last rung: ``max_steps``). Every new trial starts at
rung 0. Whenever a worker is free, the highest rung ``k`` (below the top) with a trial that is in
the top ``1/eta`` of the trials finished at rung ``k`` and not yet promoted sends that trial on to
rung ``k + 1``; only when no trial can be promoted is a new one proposed. Nothing waits for a rung
to fill up, so K workers stay busy; poor pyramids stop after ``min_steps``, good ones get up to
``max_steps``.

``Asha`` is plain bookkeeping: results in, the next promotion out. The runner owns the loop and
the log (``runner``); a promoted trial trains on from its own checkpoint (``proxy.ProxyTask``
with ``steps=``), so rung ``k + 1`` costs only the steps it adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Rungs:
    """The budgets (training steps) of the rungs: ``min_steps * eta**k`` below ``max_steps``, then
    ``max_steps``."""

    min_steps: int
    max_steps: int
    eta: int = 3

    def __post_init__(self) -> None:
        if self.min_steps < 1 or self.max_steps < self.min_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps} and {self.max_steps}")
        if self.eta < 2:
            raise ValueError(f"eta must be >= 2, got {self.eta}")

    @property
    def budgets(self) -> list[int]:
        out, steps = [], self.min_steps
        while steps < self.max_steps:
            out.append(steps)
            steps *= self.eta
        return [*out, self.max_steps]

    def __len__(self) -> int:
        return len(self.budgets)


@dataclass
class Asha:
    """Which trial goes to which rung next. ``record`` the result of a trial at a rung (reward
    ``None`` for a failed or rejected one: it counts as finished and is never promoted);
    ``next_promotion`` names one trial to promote or ``None``; ``promoted`` marks it."""

    rungs: Rungs
    results: list[dict[int, float | None]] = field(default_factory=list)
    promoted: list[set[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.rungs)
        self.results = self.results or [{} for _ in range(n)]
        self.promoted = self.promoted or [set() for _ in range(n)]

    def record(self, trial: int, rung: int, reward: float | None) -> None:
        self.results[rung][trial] = reward

    def promoted_to(self, trial: int, rung: int) -> None:
        """``trial`` left rung ``rung - 1`` for ``rung``."""
        self.promoted[rung - 1].add(trial)

    def top(self, rung: int) -> list[int]:
        """The trials in the top ``1/eta`` of those finished at ``rung`` (best first; ties: the
        earlier trial)."""
        done = self.results[rung]
        ok = sorted((-r, t) for t, r in done.items() if r is not None)
        return [t for _, t in ok[: len(done) // self.rungs.eta]]

    def next_promotion(self) -> tuple[int, int] | None:
        """``(trial, rung to train it at)``: the highest promotable rung first, as in ASHA."""
        for rung in reversed(range(len(self.rungs) - 1)):
            for trial in self.top(rung):
                if trial not in self.promoted[rung]:
                    return trial, rung + 1
        return None

    @classmethod
    def from_records(cls, rungs: Rungs, records: list[dict[str, Any]]) -> Asha:
        """The bookkeeping after the log lines ``records`` (the resume of a search): results at
        every rung, and promotions (a ``running`` line at rung > 0)."""
        asha = cls(rungs)
        for r in records:
            if "trial" not in r or "rung" not in r:
                continue
            if r["status"] == "running" and r["rung"] > 0:
                asha.promoted_to(r["trial"], r["rung"])
            elif r["status"] in ("ok", "failed", "rejected"):
                asha.record(r["trial"], r["rung"], r.get("reward") if r["status"] == "ok" else None)
        return asha
