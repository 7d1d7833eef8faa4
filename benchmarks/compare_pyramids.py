"""Pyramids compared on an untouched validation set: the same long training, several seeds, a paired test.

    python benchmarks/compare_pyramids.py --data runs/trees --val-split val \
        --genotype found="<genotype>" --baseline fpn_cells --baseline nasfpn --seeds 3 --proxy-epochs 16 \
        --proxy-optimizer adamw --proxy-lr 0.004 --proxy-weight-decay 0.05 --proxy-match-iou 0.4 \
        --proxy-precision bf16 --out runs/compare_trees.json

The last step of a search: every pyramid (``--genotype NAME=G``, a found one; ``--baseline``, the
published NAS-FPN and the FPN written as merging cells by default) is trained ``--seeds`` times
(training seeds 0, 1, ...: the same seeds for every pyramid, so runs pair up by seed) with the
proxy model of ``nasfpn search`` (the ``--proxy-*`` options; ``--proxy-epochs`` long) on the
training split, and evaluated once on the validation split, which the search never saw. Written:
the JSON (every run as it finishes: a stopped comparison continues) and a Markdown table next to
it: per pyramid the FLOPs, the AP (mean, standard error), and for each found pyramid against
each baseline the mean paired difference, its standard error, the paired t statistic and its
two-sided p-value.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from harness import kept_runs
from nasfpn.cli import add_proxy_arguments, proxy_settings
from nasfpn.core.fileio import write_json_atomic, write_text_atomic
from nasfpn.core.machine import cpu_name
from nasfpn.models.nasfpn import GENOTYPES, Genotype, parse_genotype
from nasfpn.search.data import dataset_split
from nasfpn.search.proxy import ProxyTask
from nasfpn.search.stats import mean_se, paired_test

BASELINES = GENOTYPES


# --------------------------------------------------------------------------- the comparison
def run(
    task: ProxyTask,
    pyramids: dict[str, Genotype],
    baselines: list[str],
    seeds: int,
    out: Path,
    work: Path,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train the missing runs (saving ``out`` after each) and return the comparison."""
    meta = {"settings": json.loads(json.dumps(asdict(task.settings))), "val": task.heldout_ann}
    texts = {name: g.to_string() for name, g in pyramids.items()}
    study: dict[str, Any] = {"meta": meta, "machine": {"cpu": cpu_name()}, "genotypes": texts, "runs": {}}
    study["runs"] = kept_runs(out, meta, texts)
    for k in range(seeds):  # seed-major: a stopped comparison has every pyramid at the seeds reached
        for name, genotype in pyramids.items():
            key = f"{name}|seed{k}"
            if key in study["runs"]:
                continue
            one = replace(task, settings=replace(task.settings, seed=task.settings.seed + k, seeds=1))
            wall = time.perf_counter()
            result = one(genotype, work / name / f"seed{k}", device)
            study["runs"][key] = {
                "genotype": texts[name],
                "AP": result["reward"],
                "AP50": result["metrics"].get("AP50"),
                "flops": result["cost"]["flops"],
                "wall_s": round(time.perf_counter() - wall, 1),
            }
            write_json_atomic(study, out, indent=1)
            print(f"{name} seed {k}: AP {result['reward']:.4f} on the validation set", flush=True)
    study["summary"] = summarize(study, list(pyramids), baselines, seeds)
    write_json_atomic(study, out, indent=1)
    write_text_atomic(markdown(study), out.with_suffix(".md"))
    return study


def summarize(study: dict[str, Any], names: list[str], baselines: list[str], seeds: int) -> dict[str, Any]:
    aps = {
        n: [study["runs"][f"{n}|seed{k}"]["AP"] for k in range(seeds) if f"{n}|seed{k}" in study["runs"]] for n in names
    }
    table = {}
    for n in names:
        if aps[n]:
            m, se = mean_se(aps[n])
            flops = study["runs"][f"{n}|seed0"]["flops"] if f"{n}|seed0" in study["runs"] else None
            table[n] = {"AP": aps[n], "mean": m, "se": se, "gflops": flops / 1e9 if flops else None}
    tests = {}
    for n in names:
        if n in baselines:
            continue
        for b in baselines:
            k = min(len(aps[n]), len(aps[b]))
            if k:
                tests[f"{n} - {b}"] = paired_test(aps[n][:k], aps[b][:k])
    return {"table": table, "tests": tests}


def markdown(study: dict[str, Any]) -> str:
    s = study["summary"]
    settings = study["meta"]["settings"]
    lines = [
        "# Pyramids on the untouched validation set",
        "",
        f"CPU: {study['machine']['cpu']}. Model: R{settings['depth']}, {settings['image_size']} px, "
        f"{settings['stacks']}x{settings['width']} ch, {settings['epochs']} epochs, {settings['optimizer']} "
        f"lr {settings['lr']:g}, {settings['precision']}. Validation: {study['meta']['val']}.",
        "",
        "| pyramid | GFLOPs | AP per seed | AP mean ± SE |",
        "|---|---|---|---|",
    ]
    for n, r in s["table"].items():
        per = ", ".join(f"{x:.4f}" for x in r["AP"])
        gf = f"{r['gflops']:.3f}" if r["gflops"] else "-"
        lines.append(f"| {n} | {gf} | {per} | {r['mean']:.4f} ± {r['se']:.4f} |")
    lines += ["", "| paired by seed | mean difference ± SE | t | p (two-sided) |", "|---|---|---|---|"]
    for name, t in s["tests"].items():
        lines.append(f"| {name} | {t['mean_diff']:+.4f} ± {t['se_diff']:.4f} | {t['t']:.2f} | {t['p']:.3f} |")
    lines += ["", "Genotypes:", ""] + [f"- `{n}`: `{g}`" for n, g in study["genotypes"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the comparison's JSON (a Markdown table is written next to it)")
    p.add_argument("--work", help="run folders (default: --out without its suffix)")
    p.add_argument("--data", required=True, help="a dataset folder with train and --val-split")
    p.add_argument("--data-format", default="auto", choices=["auto", "coco", "yolo", "voc"])
    p.add_argument("--val-split", default="val")
    p.add_argument("--genotype", action="append", default=[], help="NAME=GENOTYPE (repeatable)")
    p.add_argument("--baseline", action="append", choices=sorted(BASELINES), help="default: both")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    add_proxy_arguments(p)
    args = p.parse_args(argv)
    out = Path(args.out)
    work = Path(args.work) if args.work else out.with_suffix("")
    train_ann, train_images = dataset_split(args.data, "train", work, args.data_format)
    val_ann, val_images = dataset_split(args.data, args.val_split, work, args.data_format)
    task = ProxyTask.from_files(train_ann, train_images, val_ann, val_images, proxy_settings(args))
    baselines = args.baseline or sorted(BASELINES)
    pyramids: dict[str, Genotype] = {}
    for item in args.genotype:
        name, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--genotype wants NAME=GENOTYPE, got {item!r}")
        pyramids[name] = parse_genotype(text)
    pyramids.update({b: BASELINES[b] for b in baselines})
    study = run(task, pyramids, baselines, args.seeds, out, work, args.device)
    print(markdown(study), end="")
    return study


if __name__ == "__main__":
    main()
