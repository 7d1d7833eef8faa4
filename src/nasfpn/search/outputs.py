"""What a search leaves besides its log: the best genotype, its full-size config, the summary
and the plots (``write_outputs``), and the side-by-side view of several searches
(``compare_searches``).

Files written in the search folder:

``best.json``, ``best.txt``
    The best genotype in paper and node form, its reward, metrics and costs.
``best_config.yaml``
    ``SearchSpec.full_preset`` with ``model.neck.genotype`` = the best pyramid.
``summary.json``
    ``log.summarize``: counts, best, baselines, trial times, load average.
``reward.png``, ``unique.png``, ``best_cell.png``
    Reward per trial, unique architectures over time, the best pyramid's cell graph.
``rungs.png``
    Multi-fidelity searches: every trial's reward at every rung it reached.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nasfpn.core.config import config_to_yaml
from nasfpn.core.fileio import write_text_atomic
from nasfpn.models.nasfpn import Genotype
from nasfpn.search.log import LOG_NAME, baseline_results, best_result, read_log, summarize
from nasfpn.search.proxy import full_size_config
from nasfpn.search.space import PaperGenotype
from nasfpn.search.spec import SPEC_NAME, SearchSpec


def write_outputs(out_dir: str | Path, spec: SearchSpec, records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """``best.json``, ``best.txt``, ``best_config.yaml``, ``summary.json`` and the plots
    (``reward.png``, ``unique.png``, ``best_cell.png``) of the search in ``out_dir``."""
    from nasfpn.search import plots  # matplotlib is imported only when plots are drawn

    out_dir = Path(out_dir)
    records = read_log(out_dir / LOG_NAME) if records is None else records
    summary = summarize(records, spec)
    write_text_atomic(path=out_dir / "summary.json", text=json.dumps(summary, indent=1))
    baselines = {k: v for k, v in summary["baselines"].items() if v is not None}
    if spec.scheduler == "asha":
        # reward.png: rung 0, the budget every trial got (rewards of different budgets do not compare).
        budgets = spec.rungs().budgets
        shown = [r for r in records if r.get("rung", 0) == 0]
        plots.plot_rewards(shown, out_dir / "reward.png", f"{spec.controller}: rung-0 reward ({budgets[0]} steps)")
        plots.plot_rungs(records, budgets, out_dir / "rungs.png")
    else:
        plots.plot_rewards(records, out_dir / "reward.png", f"{spec.controller}: reward over trials", baselines)
    plots.plot_unique({spec.controller: records}, out_dir / "unique.png")
    best = best_result(records)
    if best is None:
        return summary
    paper = PaperGenotype.from_string(best["genotype"])
    node = Genotype.from_string(best["node_genotype"])
    write_text_atomic(
        path=out_dir / "best.json",
        text=json.dumps(
            {
                "trial": best["trial"],
                "reward": best["reward"],
                "metrics": best.get("metrics", {}),
                "cost": best.get("cost", {}),
                "genotype": paper.to_string(),
                "genotype_json": paper.to_dict(),
                "node_genotype": node.to_string(),
                "node_genotype_json": json.loads(node.to_json()),
            },
            indent=1,
        ),
    )
    base_text = "".join(f"{name:>8}: {value:.4f}\n" for name, value in sorted(baselines.items()))
    val_text = ""
    if "final" in summary:
        val_text = "on the validation set (trained once more at the top budget, after the search):\n" + "".join(
            f"{name:>8}: " + (f"{r['reward']:.4f}\n" if r["reward"] is not None else "failed\n")
            for name, r in summary["final"]["results"].items()
        )
    write_text_atomic(
        path=out_dir / "best.txt",
        text=f"best trial {best['trial']} of {summary['trials_finished']} ({spec.controller}), reward {best['reward']:.4f}\n"
        f"paper form: {paper.to_string()}\nnode form:  {node.to_string()}\n"
        + (f"baselines on the same proxy task:\n{base_text}" if base_text else "")
        + val_text,
    )
    cfg = full_size_config(node, spec.full_preset)
    write_text_atomic(
        path=out_dir / "best_config.yaml",
        text=f"# {spec.full_preset} with the pyramid found by `nasfpn search` "
        f"(trial {best['trial']}, proxy reward {best['reward']:.4f}).\n" + config_to_yaml(cfg),
    )
    plots.plot_cell_graph(
        paper,
        out_dir / "best_cell.png",
        f"best of {spec.controller} (trial {best['trial']}, reward {best['reward']:.3f})\n{paper.to_string()}",
    )
    return summary


def compare_searches(dirs: list[str | Path], out_dir: str | Path) -> list[dict[str, Any]]:
    """Side-by-side view of finished searches: ``compare_best.png`` (running best, with the
    baselines any of them evaluated), ``compare_unique.png`` and ``compare.md`` (one table row
    per search). Returns the rows."""
    from nasfpn.search import plots  # matplotlib is imported only when plots are drawn

    out_dir = Path(out_dir)
    runs: dict[str, list[dict[str, Any]]] = {}
    rows: list[dict[str, Any]] = []
    baselines: dict[str, float] = {}
    for d in map(Path, dirs):
        spec = SearchSpec.from_file(d / SPEC_NAME)
        records = read_log(d / LOG_NAME)
        name = spec.controller if spec.controller not in runs else f"{spec.controller} ({d.name})"
        runs[name] = records
        for base, r in baseline_results(records).items():
            if r.get("reward") is not None:
                baselines.setdefault(base, r["reward"])
        s = summarize(records, spec)
        rows.append(
            {
                "search": name,
                "dir": str(d),
                "trials": s["trials_finished"],
                "trained": s["ok"],
                "cached": s["cached"],
                "failed": s["failed"],
                "unique": s["unique_architectures"],
                "best_reward": s["best"]["reward"] if s["best"] else None,
                "best_trial": s["best"]["trial"] if s["best"] else None,
                "best_genotype": s["best"]["genotype"] if s["best"] else None,
                "span_s": s["span_s"],
                "trial_wall_s": s["trial_wall_s"]["mean"] if s["trial_wall_s"] else None,
            }
        )
    plots.plot_best_so_far(runs, out_dir / "compare_best.png", baselines)
    plots.plot_unique(runs, out_dir / "compare_unique.png")
    lines = [
        "| search | trials | trained | repeats | failed | unique | best reward (trial) | mean trial s | span min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        best = f"{r['best_reward']:.4f} ({r['best_trial']})" if r["best_reward"] is not None else "-"
        wall = f"{r['trial_wall_s']:.0f}" if r["trial_wall_s"] is not None else "-"
        lines.append(
            f"| {r['search']} | {r['trials']} | {r['trained']} | {r['cached']} | {r['failed']} | {r['unique']} | "
            f"{best} | {wall} | {r['span_s'] / 60:.1f} |"
        )
    for name, value in sorted(baselines.items()):
        lines.append(f"| baseline {name} | | | | | | {value:.4f} | | |")
    lines += ["", "Best genotypes (paper form):", ""]
    lines += [f"- {r['search']}: `{r['best_genotype']}`" for r in rows if r["best_genotype"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic("\n".join(lines) + "\n", out_dir / "compare.md")
    return rows
