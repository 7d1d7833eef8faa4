"""Does the proxy rank architectures as a longer training does? One study, resumable.

    python benchmarks/proxy_ranking.py --data synthetic --random 10 --seeds 3 --long-factor 4 \
        --out benchmarks/results/proxy_ranking.json
    # the same with rewards read at an early ASHA rung of a 160-step schedule, EMA weights
    python benchmarks/proxy_ranking.py --data synthetic --random 10 --seeds 3 --max-steps 160 \
        --rung-steps 20 --proxy-ema 0.95 --out runs/ranking_ema.json

Architectures: the FPN written as merging cells, the published NAS-FPN, ``--random N`` genotypes
drawn uniformly from the search space (``--random-seed``), and every ``--genotype`` given (a
name, a node-form or paper-form string, or JSON). Each is trained

- as the proxy, ``--seeds`` times (seeds ``--seed``, ``--seed + 1``, ...): the reward is the
  held-out AP, at step ``--rung-steps`` of the ``--max-steps`` schedule when one is set (what an
  ASHA rung sees), else after ``--proxy-epochs``;
- as the "long" run, ``--long-seeds`` times: the same model and data, ``--long-factor`` times the
  steps (``K x --max-steps``, or ``K x --proxy-epochs``), its own schedule to the end.

With ``--val-ann``/``--val-images`` (an untouched set), every long run's final weights are also
scored there, and the table adds the study's pick among the non-baselines (a random search over
them) against FPN and NAS-FPN on it, paired by seed.

Both go through ``search.proxy.ProxyTask``, the search's own trainer and reward. Written: the JSON
(``--out``; every run as it finishes, so a stopped study continues where it was, skipping the
runs already in it) and a Markdown table next to it: per architecture the proxy reward and the
long-run AP (mean, sd), their ranks, the Spearman correlation of the two means, the seed-to-seed
and the between-architecture spread of the proxy, and the CPU seconds per run (``process_time``
of this process: the trainer runs in it, data loading included) with the CPU's name.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness import kept_runs
from nasfpn.cli import add_proxy_arguments, proxy_settings
from nasfpn.core.fileio import write_json_atomic, write_text_atomic
from nasfpn.core.machine import cpu_name
from nasfpn.deploy.predictor import load
from nasfpn.engine.evaluate import check_ground_truth, evaluate_model
from nasfpn.models.nasfpn import GENOTYPES, Genotype, parse_genotype
from nasfpn.search.proxy import OTHER_WEIGHTS, ProxySettings, ProxyTask, prepare_proxy_task
from nasfpn.search.space import SearchSpace, parse_paper_genotype
from nasfpn.search.stats import paired_test, ranks, spearman

KINDS = ("proxy", "long")
BASELINES = {name: GENOTYPES[name] for name in ("fpn_cells", "nasfpn")}
"""The published pyramids every study includes, in the order they are trained and listed."""
Evaluate = Callable[[Genotype, str, int, Path], dict[str, Any]]
"""``(genotype, kind, seed index, run folder) -> {"reward": AP, ...}`` (one training run)."""


# --------------------------------------------------------------------------- architectures
def read_genotype(text: str) -> Genotype:
    """A genotype from the command line: a name, the paper's form, or the node form."""
    try:
        return parse_paper_genotype(text).lower()
    except (ValueError, KeyError, json.JSONDecodeError):
        return parse_genotype(text)


def architectures(
    random: int = 0, random_seed: int = 0, extra: tuple[str, ...] = (), num_cells: int = 7, gp: str = "mmdet"
) -> dict[str, Genotype]:
    """The studied genotypes by name: ``fpn_cells``, ``nasfpn``, ``random_0..``, ``arg_0..``."""
    out = dict(BASELINES)
    space = SearchSpace.create(num_cells, gp)
    rng = np.random.default_rng(random_seed)
    for k in range(random):
        out[f"random_{k}"] = space.sample(rng).lower()
    for k, text in enumerate(extra):
        out[f"arg_{k}"] = read_genotype(text)
    return out


def _mean_sd(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


# --------------------------------------------------------------------------- the study
def run_key(name: str, kind: str, seed_index: int) -> str:
    return f"{name}|{kind}|{seed_index}"


def run_study(
    genotypes: dict[str, Genotype],
    evaluate: Evaluate,
    out: Path,
    seeds: int = 3,
    long_seeds: int = 3,
    meta: dict[str, Any] | None = None,
    work: Path | None = None,
    say: Callable[[str], None] = print,
    machine: dict[str, Any] | None = None,
    rescore: Callable[[Path], dict[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """Train every missing run, saving ``out`` after each; return the study (``summarize``'d).

    A study already in ``out`` continues: its runs are kept and not trained again (those of a
    name whose genotype changed excepted); one made with other ``meta`` (the settings) is
    refused, since its rewards would not compare. ``machine`` (the CPU) is recorded with each run.
    ``rescore(run folder)``: scores on the untouched set for kept long runs that have none yet
    (a study trained with ``--keep-weights`` before ``--val-ann`` was given); ``None``: no weights.
    """
    out = Path(out)
    work = Path(work) if work is not None else out.with_suffix("")
    meta = json.loads(json.dumps(meta or {}))
    machine = machine if machine is not None else {"cpu": cpu_name(), "torch_threads": torch.get_num_threads()}
    texts = {name: g.to_string() for name, g in genotypes.items()}
    study: dict[str, Any] = {"meta": meta, "machine": machine, "genotypes": texts, "runs": {}}
    study["runs"] = kept_runs(out, meta, texts)
    if rescore is not None:
        for key, r in study["runs"].items():
            name, kind, k = key.split("|")
            if kind == "long" and "val_AP" not in r and (scores := rescore(work / name / f"long_seed{k}")):
                r.update(scores)
                say(f"{name} long seed {k}: scored on the untouched set from its kept weights")
    # Seed-major: a study stopped part-way has every architecture at the seeds it reached.
    todo = [
        (name, kind, k)
        for kind, n in (("proxy", seeds), ("long", long_seeds))
        for k in range(n)
        for name in genotypes
        if run_key(name, kind, k) not in study["runs"]
    ]
    if len(todo) < len(genotypes) * (seeds + long_seeds):
        say(f"{out}: {len(genotypes) * (seeds + long_seeds) - len(todo)} run(s) kept, {len(todo)} to train")
    for i, (name, kind, k) in enumerate(todo):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        result = evaluate(genotypes[name], kind, k, work / name / f"{kind}_seed{k}")
        run = {
            "genotype": texts[name],
            "reward": float(result["reward"]),
            "cpu_s": round(time.process_time() - cpu0, 2),
            "wall_s": round(time.perf_counter() - wall0, 2),
            **machine,
            **{key: v for key, v in result.items() if key != "reward"},
        }
        study["runs"][run_key(name, kind, k)] = run
        study.update(summarize(study, genotypes, seeds, long_seeds))
        write_json_atomic(study, out)
        say(f"[{i + 1}/{len(todo)}] {name} {kind} seed {k}: AP {run['reward']:.4f} ({run['cpu_s']:.0f} CPU s)")
    study.update(summarize(study, genotypes, seeds, long_seeds))
    write_json_atomic(study, out)
    write_text_atomic(markdown(study), out.with_suffix(".md"))
    return study


def summarize(study: dict[str, Any], genotypes: dict[str, Genotype], seeds: int, long_seeds: int) -> dict[str, Any]:
    """Per architecture: mean/sd of the proxy reward, of the long-run AP and (when scored) of the
    long runs' AP on the untouched set, CPU s per run; over the architectures with every run: the
    Spearman correlation of the means, the spreads, how well each side ranks against itself
    (``self_rank``), the correlation against the number of proxy seeds, and the pyramid the proxy
    ranks first among the non-baselines against the baselines on the untouched set."""
    runs = study["runs"]
    table = {}
    for name in genotypes:
        row: dict[str, Any] = {}
        for kind, n in (("proxy", seeds), ("long", long_seeds)):
            done = [runs[key] for k in range(n) if (key := run_key(name, kind, k)) in runs]
            row[f"{kind}_mean"], row[f"{kind}_sd"] = _mean_sd([r["reward"] for r in done])
            row[f"{kind}_n"] = len(done)
            row[f"{kind}_cpu_s"] = statistics.fmean(r["cpu_s"] for r in done) if done else None
        val = [
            runs[run_key(name, "long", k)].get("val_AP") for k in range(long_seeds) if run_key(name, "long", k) in runs
        ]
        val = [v for v in val if v is not None]
        row["val_mean"], row["val_sd"] = _mean_sd(val)
        row["val_n"] = len(val)
        table[name] = row
    both = [name for name, row in table.items() if row["proxy_n"] == seeds and row["long_n"] == long_seeds]
    proxy = [table[name]["proxy_mean"] for name in both]
    long = [table[name]["long_mean"] for name in both]
    for name, r in zip(both, ranks([-x for x in proxy])):
        table[name]["proxy_rank"] = r
    for name, r in zip(both, ranks([-x for x in long])):
        table[name]["long_rank"] = r
    seed_sds = [table[n]["proxy_sd"] for n in both if table[n]["proxy_sd"] is not None]
    out: dict[str, Any] = {
        "table": table,
        "complete": both,
        "spearman": spearman(proxy, long),
        "proxy_seed_sd": statistics.fmean(seed_sds) if seed_sds else None,
        "proxy_between_sd": statistics.stdev(proxy) if len(proxy) > 1 else None,
        "self_rank": {kind: self_rank(runs, both, kind, n) for kind, n in (("proxy", seeds), ("long", long_seeds))},
        "proxy_vs_other_long": proxy_vs_other_long(runs, both, proxy, long_seeds),
        "by_proxy_seeds": by_proxy_seeds(runs, both, seeds, long),
    }
    if both:
        # What a search would lose by trusting the proxy: the long-run AP of its first pick below the best.
        pick = max(both, key=lambda n: table[n]["proxy_mean"])
        out["regret"] = {"pick": pick, "long_gap": max(long) - table[pick]["long_mean"]}
    scored = [n for n in both if table[n]["val_n"] == long_seeds]
    if len(scored) == len(both) and both:
        out["spearman_val"] = {
            "proxy": spearman(proxy, [table[n]["val_mean"] for n in both]),
            "long": spearman(long, [table[n]["val_mean"] for n in both]),
        }
        out["untouched"] = found_against_baselines(runs, table, both, long_seeds)
    return out


def _leave_one_seed_out(
    runs: dict[str, Any], names: list[str], kind: str, n: int, fixed: list[float] | None = None
) -> float | None:
    """Mean over the seeds ``k`` of ``kind`` of the Spearman correlation between seed ``k``'s
    rewards (or ``fixed``, the same for every ``k``) and the mean of the other seeds' rewards."""
    if n < 2 or len(names) < 3:
        return None
    rhos = []
    for k in range(n):
        one = fixed if fixed is not None else [runs[run_key(name, kind, k)]["reward"] for name in names]
        rest = [statistics.fmean(runs[run_key(name, kind, j)]["reward"] for j in range(n) if j != k) for name in names]
        rho = spearman(one, rest)
        if rho is not None:
            rhos.append(rho)
    return statistics.fmean(rhos) if rhos else None


def self_rank(runs: dict[str, Any], names: list[str], kind: str, n: int) -> float | None:
    """How well one run ranks the architectures as the other runs of the same kind do (a ceiling
    on how well anything can agree with this kind's means)."""
    return _leave_one_seed_out(runs, names, kind, n)


def proxy_vs_other_long(runs: dict[str, Any], names: list[str], proxy: list[float], n: int) -> float | None:
    """The proxy means against the same targets as the long runs' ``self_rank`` (the mean of the
    long seeds but one, averaged over the one left out): the two compare per CPU second."""
    return _leave_one_seed_out(runs, names, "long", n, fixed=proxy)


def by_proxy_seeds(runs: dict[str, Any], names: list[str], seeds: int, long: list[float]) -> list[dict[str, Any]]:
    """Spearman(mean of k proxy seeds, long-run mean) for k = 1..seeds, averaged over every set of
    k seeds, with the CPU seconds those k proxy runs cost per architecture."""
    out = []
    for k in range(1, seeds + 1):
        rhos = []
        for subset in itertools.combinations(range(seeds), k):
            means = [statistics.fmean(runs[run_key(name, "proxy", j)]["reward"] for j in subset) for name in names]
            rho = spearman(means, long)
            if rho is not None:
                rhos.append(rho)
        cpu = [runs[run_key(name, "proxy", j)]["cpu_s"] for name in names for j in range(seeds)]
        out.append(
            {
                "seeds": k,
                "spearman": statistics.fmean(rhos) if rhos else None,
                "cpu_s": k * statistics.fmean(cpu) if cpu else None,
            }
        )
    return out


def found_against_baselines(
    runs: dict[str, Any], table: dict[str, Any], names: list[str], long_seeds: int
) -> dict[str, Any] | None:
    """The search's pick (the highest proxy mean that is not a baseline: a random search over the
    study's other architectures) against FPN and NAS-FPN on the untouched set, paired by seed."""
    candidates = [n for n in names if n not in BASELINES]
    present = [b for b in BASELINES if b in names]
    if not candidates or not present:
        return None
    found = max(candidates, key=lambda n: table[n]["proxy_mean"])

    def val(name: str) -> list[float]:
        return [runs[run_key(name, "long", k)]["val_AP"] for k in range(long_seeds)]

    return {
        "found": found,
        "val_AP": {n: val(n) for n in [found, *present]},
        "tests": {f"{found} - {b}": paired_test(val(found), val(b)) for b in present},
    }


def _fmt(mean: float | None, sd: float | None, n: int) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f}" + (f" ± {sd:.4f}" if sd is not None else "") + f" ({n})"


def _rho(rho: float | None) -> str:
    return "undefined" if rho is None else f"{rho:.3f}"


def markdown(study: dict[str, Any]) -> str:
    meta, machine = study["meta"], study.get("machine", {})
    rho = study["spearman"]
    lines = [
        "# Proxy ranking",
        "",
        f"CPU: {machine.get('cpu', '?')}, {machine.get('torch_threads', '?')} torch threads. Proxy: {meta.get('proxy', '')}. Long run: {meta.get('long', '')}.",
        "",
        f"Spearman(proxy mean, long-run mean) over {len(study['complete'])} architectures: "
        + (f"**{rho:.3f}**" if rho is not None else "undefined (fewer than 3 complete, or a constant side)"),
        "",
    ]
    if study["proxy_seed_sd"] is not None and study["proxy_between_sd"] is not None:
        lines += [
            f"Proxy spread: seed-to-seed sd {study['proxy_seed_sd']:.4f} (mean over architectures), "
            f"between architectures (sd of the means) {study['proxy_between_sd']:.4f}.",
            "",
        ]
    regret = study.get("regret")
    if regret:
        lines += [
            f"The proxy's first pick, `{regret['pick']}`, is {regret['long_gap']:.4f} AP below the best long-run mean.",
            "",
        ]
    selfr = study.get("self_rank") or {}
    if selfr.get("proxy") is not None and selfr.get("long") is not None:
        lines += [
            f"Each side against itself (one seed's ranking against the mean of the other seeds', mean over "
            f"the seeds): proxy {selfr['proxy']:.3f}, long run {selfr['long']:.3f}; the proxy means against "
            f"the same targets as the long run's: {_rho(study.get('proxy_vs_other_long'))}.",
            "",
        ]
    curve = [c for c in study.get("by_proxy_seeds") or [] if c["spearman"] is not None]
    if curve:
        lines += [
            "| proxy seeds averaged | Spearman with the long-run means | CPU s per architecture |",
            "|---|---|---|",
        ]
        lines += [f"| {c['seeds']} | {c['spearman']:.3f} | {c['cpu_s']:.0f} |" for c in curve]
        lines.append("")
    val = study.get("spearman_val")
    if val:
        lines += [
            f"On the untouched set (the long runs' final weights): Spearman with the proxy means "
            f"{_rho(val['proxy'])}, with the long runs' held-out means {_rho(val['long'])}.",
            "",
        ]
    scored = any(r.get("val_n") for r in study["table"].values())
    lines += [
        "| architecture | proxy AP mean ± sd (runs) | long-run AP mean ± sd (runs) | proxy rank | long rank "
        "| CPU s / proxy run | CPU s / long run |" + (" untouched-set AP (long runs) |" if scored else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if scored else ""),
    ]
    rows = sorted(study["table"].items(), key=lambda kv: kv[1].get("long_rank", math.inf))
    for name, r in rows:
        cells = [
            name,
            _fmt(r["proxy_mean"], r["proxy_sd"], r["proxy_n"]),
            _fmt(r["long_mean"], r["long_sd"], r["long_n"]),
            f"{r['proxy_rank']:g}" if "proxy_rank" in r else "-",
            f"{r['long_rank']:g}" if "long_rank" in r else "-",
            f"{r['proxy_cpu_s']:.1f}" if r["proxy_cpu_s"] is not None else "-",
            f"{r['long_cpu_s']:.1f}" if r["long_cpu_s"] is not None else "-",
        ]
        if scored:
            cells.append(_fmt(r["val_mean"], r["val_sd"], r["val_n"]))
        lines.append("| " + " | ".join(cells) + " |")
    pick = study.get("untouched")
    if pick:
        lines += [
            "",
            f"The proxy's pick among the non-baselines, `{pick['found']}`, against the baselines on the "
            "untouched set (the long runs, paired by seed):",
            "",
            "| pyramid | AP per seed | mean |",
            "|---|---|---|",
        ]
        for name, aps in pick["val_AP"].items():
            lines.append(f"| {name} | {', '.join(f'{x:.4f}' for x in aps)} | {statistics.fmean(aps):.4f} |")
        lines += ["", "| paired by seed | mean difference ± SE | t | p (two-sided) |", "|---|---|---|---|"]
        for name, t in pick["tests"].items():
            lines.append(f"| {name} | {t['mean_diff']:+.4f} ± {t['se_diff']:.4f} | {t['t']:.2f} | {t['p']:.3f} |")
    lines += ["", "Genotypes:", ""] + [f"- `{name}`: `{g}`" for name, g in study["genotypes"].items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the trainer
def score_weights(run_dir: Path, ann: str, images: str, device: str = "cpu") -> dict[str, Any] | None:
    """AP and AP50 of a finished run's final weights (``last.safetensors``, which carries its
    config) on another annotated set, evaluated as the trainer evaluates; ``None`` without them.
    The set's ground truth is checked once by the caller (``check_untouched_set``), not per run."""
    weights = Path(run_dir) / "last.safetensors"
    if not weights.is_file():
        return None
    det = load(None, weights=weights, device=device, optimize=False)
    cfg = det.config
    metrics, _ = evaluate_model(
        det.model, cfg, ann, images, device, cfg.data.batch_size, 0, progress=False, amp=cfg.train.amp, check=False
    )
    assert metrics is not None  # one process
    return {"val_AP": float(metrics["AP"]), "val_AP50": float(metrics["AP50"])}


def check_untouched_set(ann: str, images: str) -> None:
    """Refuse a missing or malformed untouched set before any run is trained for it."""
    if not Path(images).is_dir():
        raise SystemExit(f"--val-images {images}: no such folder (the images of --val-ann {ann})")
    try:
        check_ground_truth(ann, images)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def proxy_evaluator(
    task: ProxyTask,
    long_factor: int,
    rung_steps: int = 0,
    device: str = "cpu",
    keep_weights: bool = False,
    val: tuple[str, str] | None = None,
) -> Evaluate:
    """Runs of ``task``: the proxy (at ``rung_steps`` of its ``max_steps`` schedule when set) and
    the long run (``long_factor`` x the steps, its own schedule), one seed each. ``val``
    (annotations, images): every long run's final weights are also scored on that set."""
    s = task.settings
    if rung_steps and not s.max_steps:
        raise SystemExit("--rung-steps needs --max-steps (the schedule the rung is a prefix of)")
    long_settings = replace(s, epochs=s.epochs * long_factor, max_steps=s.max_steps * long_factor)

    def evaluate(genotype: Genotype, kind: str, seed_index: int, run_dir: Path) -> dict[str, Any]:
        settings = long_settings if kind == "long" else s
        scored_on = val if kind == "long" else None
        keep = keep_weights or scored_on is not None
        one = replace(task, settings=replace(settings, seed=s.seed + seed_index, seeds=1), keep_weights=keep)
        steps = (rung_steps or s.max_steps) if kind == "proxy" else long_settings.max_steps
        result = one(genotype, run_dir, device, steps=steps or None)
        scores = score_weights(run_dir, *scored_on, device) if scored_on is not None else None
        if not keep_weights:
            for name in ("last.pt", *OTHER_WEIGHTS):
                (run_dir / name).unlink(missing_ok=True)  # a rung below the top keeps last.pt for a promotion
        return {
            "reward": result["reward"],
            "AP50": result["metrics"].get("AP50"),
            "train_s": result["cost"]["train_s"],
            "steps": result["cost"].get("steps"),
            "flops": result["cost"]["flops"],
            "params": result["cost"]["params"],
            **(scores or {}),
        }

    return evaluate


def _describe(s: ProxySettings, rung_steps: int, factor: int) -> tuple[str, str]:
    base = (
        f"R{s.depth}, {s.image_size} px, {s.stacks}x{s.width} ch, batch {s.batch_size}, {s.optimizer} lr {s.lr:g} "
        f"(wd {s.weight_decay:g}), anchors matched at IoU {s.match_iou:g}, {s.precision}"
    )
    base += f", EMA {s.ema:g} (tau {s.ema_tau:g})" if s.ema else ", no EMA"
    if s.max_steps:
        proxy = f"{base}; AP at step {rung_steps or s.max_steps} of a {s.max_steps}-step schedule"
        long = f"{factor * s.max_steps} steps"
    else:
        proxy, long = f"{base}; {s.epochs} epochs", f"{factor * s.epochs} epochs"
    return proxy, long


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the study's JSON (a Markdown table is written next to it)")
    p.add_argument("--work", help="run folders (default: --out without its suffix)")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a dataset folder (as nasfpn search)")
    p.add_argument("--train-ann")
    p.add_argument("--train-images")
    p.add_argument("--heldout-ann")
    p.add_argument("--heldout-images")
    p.add_argument("--val-ann", help="an untouched set: every long run's final weights are scored on it too")
    p.add_argument("--val-images")
    p.add_argument("--holdout", default="auto", help="held-out images: a count, a fraction or 'auto'")
    p.add_argument("--synthetic-images", type=int, default=400)
    p.add_argument("--synthetic-size", type=int, default=0, help="default: the proxy image size")
    p.add_argument("--synthetic-min-size", type=float, help="shape side / image side (default: the generator's)")
    p.add_argument("--random", type=int, default=0, help="random genotypes from the search space")
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--cells", type=int, default=7)
    p.add_argument("--gp", default="mmdet", choices=["mmdet", "tf", "both"])
    p.add_argument("--genotype", action="append", default=[], help="more architectures (repeatable)")
    p.add_argument("--seeds", type=int, default=3, help="proxy runs per architecture")
    p.add_argument("--long-seeds", type=int, default=0, help="long runs per architecture (default: --seeds)")
    p.add_argument("--long-factor", type=int, default=4, help="the long run's steps / the proxy's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=0, help="a step schedule instead of --proxy-epochs")
    p.add_argument("--rung-steps", type=int, default=0, help="read the proxy reward at this step (an ASHA rung)")
    add_proxy_arguments(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--keep-weights", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = proxy_settings(args, seed=args.seed, max_steps=args.max_steps)
    out = Path(args.out)
    work = Path(args.work) if args.work else out.with_suffix("")
    task = prepare_proxy_task(
        work,
        settings,
        None if args.train_ann else args.data,
        args.train_ann,
        args.train_images,
        args.heldout_ann,
        args.heldout_images,
        args.holdout,
        args.seed,
        args.synthetic_images,
        args.synthetic_size or None,
        synthetic_min_size=args.synthetic_min_size,
    )
    genotypes = architectures(args.random, args.random_seed, tuple(args.genotype), args.cells, args.gp)
    proxy, long = _describe(settings, args.rung_steps, args.long_factor)
    meta = {
        "device": args.device,
        "proxy": proxy,
        "long": long,
        "settings": asdict(settings),
        "rung_steps": args.rung_steps,
        "long_factor": args.long_factor,
        "data": {"train": task.train_ann, "heldout": task.heldout_ann},
    }
    long_seeds = args.long_seeds or args.seeds
    val = (args.val_ann, args.val_images or str(Path(args.val_ann).parent)) if args.val_ann else None
    evaluate = proxy_evaluator(task, args.long_factor, args.rung_steps, args.device, args.keep_weights, val)
    rescore = None
    if val is not None:
        ann, images = val
        check_untouched_set(ann, images)

        def rescore(run_dir: Path) -> dict[str, Any] | None:
            return score_weights(run_dir, ann, images, args.device)

    study = run_study(genotypes, evaluate, out, args.seeds, long_seeds, meta, work, rescore=rescore)
    print(markdown(study), end="")
    return study


if __name__ == "__main__":
    main()
