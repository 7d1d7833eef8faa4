"""A run that fits a time budget: how many steps the rest of the time allows, re-planned as it goes.

``train(..., time_limit=S, fit_to_time=True)`` asks the schedule to end, final evaluation and
checkpoint included, within ``S`` seconds. The run's length is then not known before it starts:
every ``REPLAN_EVERY`` steps ``TimeBudget.plan`` turns what was measured so far (seconds per
training step, seconds per evaluation) into the number of steps that fit, and the learning-rate
schedule is compressed to that length (``LRSchedule.fit``). One run, no restart: the estimate only
sharpens, so the planned length settles within the first few dozen steps.
"""

from __future__ import annotations

from dataclasses import dataclass

REPLAN_EVERY = 10
"""Steps between two plans."""
FIRST_PLAN = 5
"""Steps measured before the first plan (the first ones are slower: allocations, caches)."""


def estimate_eval_seconds(num_images: int, batch_size: int, seconds_per_step: float) -> float:
    """An evaluation (with its checkpoint) before one was timed: a forward pass per image costs
    about a third of a training step's share of it, plus the scoring and the checkpoint, which run
    on the CPU: about 2 s where a step takes 0.1 s, and slower as the steps are on a slower CPU
    (the demo's final evaluation took 15 s at 0.43 s per step, where a constant 2 s planned 6.5)."""
    return max(2.0, 20.0 * seconds_per_step) + num_images / batch_size * seconds_per_step / 3


@dataclass
class TimeBudget:
    """What the rest of a time-limited run can afford."""

    seconds: float
    """The whole budget of this call, from its start."""
    full_iters: int
    """The configured schedule's length: a plan never exceeds it."""
    iters_per_epoch: int
    eval_interval: int
    """Evaluations after every this many epochs, and one at the end."""
    eval_seconds: float | None = None
    """Measured duration of one evaluation (with its checkpoint); None until one ran."""
    eval_estimate: float = 0.0
    """Used for ``eval_seconds`` until an evaluation was measured."""
    margin: float = 0.03
    """Fraction of the time left kept aside for what is not measured (curves, the summary)."""

    def evaluations_left(self, step: int, total: int) -> int:
        """Evaluations after ``step`` in a run of ``total`` steps: every ``eval_interval`` epochs
        before the end, and the final one."""
        every = max(1, self.eval_interval) * self.iters_per_epoch
        return max(0, (total - 1) // every - step // every) + 1

    def cost(self, step: int, total: int, seconds_per_step: float) -> float:
        """Seconds from ``step`` to the end of a run of ``total`` steps, evaluations included."""
        eval_s = self.eval_seconds if self.eval_seconds is not None else self.eval_estimate
        return (total - step) * seconds_per_step + self.evaluations_left(step, total) * eval_s

    def plan(self, step: int, seconds_used: float, seconds_per_step: float) -> int:
        """The run's length in steps: the most that the time left allows, at least ``step + 1`` and
        at most ``full_iters``. ``seconds_used``: of the budget so far; ``seconds_per_step``: measured."""
        left = (self.seconds - seconds_used) * (1.0 - self.margin)
        lo, hi = step + 1, max(step + 1, self.full_iters)
        if self.cost(step, hi, seconds_per_step) <= left:
            return hi
        while lo < hi:  # the cost grows with the length: the longest plan that fits
            mid = (lo + hi + 1) // 2
            if self.cost(step, mid, seconds_per_step) <= left:
                lo = mid
            else:
                hi = mid - 1
        return lo
