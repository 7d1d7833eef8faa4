"""Search plots: reward over trials, unique architectures over time (paper Fig. 5), rewards per
rung of a multi-fidelity search, cell graph.

Every function takes plain data (log records, genotypes) and writes one PNG with matplotlib's
non-interactive backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch

from nasfpn.models.nasfpn import LEVELS
from nasfpn.search.log import rung_results, trial_results, unique_counts
from nasfpn.search.space import NUM_INPUTS, PaperGenotype, pool_name

OP_COLOURS = {"sum": "#9ecae1", "gp": "#fdae6b", "gp_tf": "#a1d99b"}


def running_best(rewards: list[float | None]) -> list[float | None]:
    best, out = None, []
    for r in rewards:
        if r is not None and (best is None or r > best):
            best = r
        out.append(best)
    return out


def rolling_mean(rewards: list[float | None], window: int = 10) -> list[float]:
    """Mean of the last ``window`` rewards (failed trials count as 0, as the controller sees them)."""
    values = [r if r is not None else 0.0 for r in rewards]
    return [sum(values[max(0, i + 1 - window) : i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(values))]


def plot_rewards(
    records: list[dict[str, Any]], path: str | Path, title: str = "", baselines: dict[str, float] | None = None
) -> Path:
    """Reward of every trial (failed ones as crosses at 0) with the running best, the mean of the
    last 10 trials, and baseline genotypes' rewards as horizontal lines."""
    results = trial_results(records)
    fig, ax = plt.subplots(figsize=(7, 4))
    ok = [(r["trial"], r["reward"]) for r in results if r["status"] == "ok"]
    cached = [(r["trial"], r["reward"]) for r in results if r["status"] == "cached"]
    failed = [r["trial"] for r in results if r["status"] == "failed"]
    if ok:
        ax.scatter([t for t, _ in ok], [r for _, r in ok], s=14, color="#3182bd", label="trial")
    if cached:
        ax.scatter(
            [t for t, _ in cached],
            [r for _, r in cached],
            s=14,
            facecolors="none",
            edgecolors="#3182bd",
            label="repeat (cached)",
        )
    if failed:
        ax.scatter(failed, [0.0] * len(failed), marker="x", color="#de2d26", label="failed")
    best = running_best([r["reward"] for r in results])
    xs = [r["trial"] for r in results]
    if any(b is not None for b in best):
        ax.step(
            xs, [b if b is not None else float("nan") for b in best], where="post", color="black", label="best so far"
        )
        ax.plot(xs, rolling_mean([r["reward"] for r in results]), color="grey", label="mean of last 10")
    for i, (name, value) in enumerate(sorted((baselines or {}).items())):
        ax.axhline(value, linestyle="--", color=f"C{i + 3}", label=f"{name} ({value:.3f})")
    ax.set_xlabel("trial")
    ax.set_ylabel("proxy reward (AP)")
    ax.set_title(title or "reward over trials")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_unique(runs: dict[str, list[dict[str, Any]]], path: str | Path, title: str = "") -> Path:
    """Distinct architectures proposed against architectures proposed, one curve per run
    (paper Fig. 5: a controller that converges proposes fewer new ones)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    n_max = 1
    for name, records in runs.items():
        counts = unique_counts(records)
        n_max = max(n_max, len(counts))
        ax.plot(range(1, len(counts) + 1), counts, label=name)
    ax.plot([0, n_max], [0, n_max], linestyle=":", color="grey", label="all distinct")
    ax.set_xlabel("architectures proposed")
    ax.set_ylabel("unique architectures")
    ax.set_title(title or "unique architectures over time")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_best_so_far(
    runs: dict[str, list[dict[str, Any]]], path: str | Path, baselines: dict[str, float] | None = None, title: str = ""
) -> Path:
    """Several searches side by side: running best reward (left) and mean reward of the last 10
    trials (right), with the baselines."""
    fig, (ax, ax_mean) = plt.subplots(1, 2, figsize=(12, 4))
    for i, (name, records) in enumerate(runs.items()):
        results = trial_results(records)
        xs = [r["trial"] for r in results]
        best = running_best([r["reward"] for r in results])
        ax.step(xs, [b if b is not None else float("nan") for b in best], where="post", color=f"C{i}", label=name)
        ax_mean.plot(xs, rolling_mean([r["reward"] for r in results]), color=f"C{i}", label=name)
    for a in (ax, ax_mean):
        for i, (name, value) in enumerate(sorted((baselines or {}).items())):
            a.axhline(value, linestyle="--", color=f"C{i + 5}", label=f"{name} ({value:.3f})")
        a.set_xlabel("trial")
        a.legend(fontsize=8, loc="lower right")
        a.grid(alpha=0.3)
    ax.set_ylabel("best proxy reward (AP)")
    ax.set_title(title or "best reward so far")
    ax_mean.set_ylabel("proxy reward (AP)")
    ax_mean.set_title("mean reward of the last 10 trials")
    return _save(fig, path)


def plot_rungs(records: list[dict[str, Any]], budgets: list[int], path: str | Path, title: str = "") -> Path:
    """A multi-fidelity search: the reward of every trial at every rung it reached (x: training
    steps, log scale), a line per trial, so promotions and early stops show."""
    fig, ax = plt.subplots(figsize=(7, 4))
    curves: dict[int, list[tuple[int, float]]] = {}
    for (trial, rung), r in sorted(rung_results(records).items()):
        if r["status"] == "ok":
            curves.setdefault(trial, []).append((budgets[rung], r["reward"]))
    for points in curves.values():
        top = len(points) == len(budgets)
        ax.plot(
            [x for x, _ in points],
            [y for _, y in points],
            marker="o",
            markersize=3,
            linewidth=1.2 if top else 0.6,
            color="#d94801" if top else "#6baed6",
            alpha=1.0 if top else 0.6,
        )
    for steps in budgets:
        ax.axvline(steps, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("training steps (rung budget)")
    ax.set_ylabel("proxy reward (AP)")
    ax.set_title(title or "successive halving: reward per rung (orange: reached the top rung)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_cell_graph(genotype: PaperGenotype, path: str | Path, title: str = "") -> Path:
    """The pyramid network drawn as a graph: one row per level (P3 at the bottom), inputs on the
    left, then the cells in build order; node colour = op, arrows = inputs (solid: input 1,
    dashed: input 2), dotted grey = an unconsumed feature summed into an output cell; output
    cells have a bold outline."""
    n = genotype.num_cells
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * n, 4.2))
    pos = {i: (0.0, float(level)) for i, level in enumerate(LEVELS)}
    for k, cell in enumerate(genotype.cells):
        pos[NUM_INPUTS + k] = (float(k + 1), float(cell.level))
    n_mid = genotype.num_intermediate

    def arrow(a: int, b: int, style: str, colour: str, rad: float) -> None:
        ax.add_patch(
            FancyArrowPatch(
                pos[a],
                pos[b],
                arrowstyle="-|>",
                mutation_scale=10,
                linestyle=style,
                color=colour,
                lw=1.2,
                shrinkA=13,
                shrinkB=13,
                connectionstyle=f"arc3,rad={rad}",
                zorder=1,
            )
        )

    for k, cell in enumerate(genotype.cells):
        node = NUM_INPUTS + k
        for j, (x, style) in enumerate(zip(cell.inputs, ("-", "--"))):
            rad = 0.0 if abs(pos[x][1] - pos[node][1]) + abs(pos[x][0] - pos[node][0]) <= 1 else 0.25 * (1 if j else -1)
            arrow(x, node, style, "#444444", rad)
    for k, extra in genotype.summed_unconsumed().items():
        for x in extra:  # same level: a shallow arc bending towards the middle of the plot
            node = NUM_INPUTS + k
            rad = (0.5 if genotype.cells[k].level >= LEVELS[2] else -0.5) / max(1.0, pos[node][0] - pos[x][0])
            arrow(x, node, ":", "#999999", rad)
    for i, level in enumerate(LEVELS):
        ax.scatter(*pos[i], s=700, color="white", edgecolors="black", zorder=2)
        ax.annotate(f"P{level}", pos[i], ha="center", va="center", fontsize=9, zorder=3)
    for k, cell in enumerate(genotype.cells):
        node = NUM_INPUTS + k
        output = k >= n_mid
        ax.scatter(
            *pos[node],
            s=700,
            color=OP_COLOURS.get(cell.op, "white"),
            edgecolors="black",
            linewidths=2.5 if output else 0.8,
            zorder=2,
        )
        ax.annotate(f"{pool_name(node)}\n{cell.op}", pos[node], ha="center", va="center", fontsize=7, zorder=3)
        if output:
            ax.annotate(
                f"out P{cell.level}", (pos[node][0], pos[node][1] + 0.42), ha="center", fontsize=7, fontweight="bold"
            )
    ax.set_yticks(list(LEVELS), [f"P{lv} (/{2**lv})" for lv in LEVELS])
    ax.set_xticks(range(n + 1), ["inputs"] + [pool_name(NUM_INPUTS + k) for k in range(n)])
    ax.set_xlim(-0.6, n + 0.6)
    ax.set_ylim(LEVELS[0] - 0.6, LEVELS[-1] + 0.7)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    handles = [
        Line2D([], [], marker="o", linestyle="", markersize=9, markerfacecolor=c, markeredgecolor="black", label=op)
        for op, c in OP_COLOURS.items()
        if any(cell.op == op for cell in genotype.cells)
    ]
    handles += [
        Line2D([], [], color="#444444", label="input 1"),
        Line2D([], [], color="#444444", linestyle="--", label="input 2"),
        Line2D([], [], color="#999999", linestyle=":", label="unconsumed, summed in"),
    ]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title or genotype.to_string(), fontsize=8)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
