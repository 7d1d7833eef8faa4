"""Time to accuracy of ``nasfpn demo`` on this CPU and on CPUs emulated 2x and 4x slower.

    python benchmarks/demo_curves.py --factors 1 2 4 --out runs/demo_curves
    python benchmarks/demo_curves.py --from 1=runs/demo 4=runs/demo_curves/x4   # tables of finished runs

Each factor runs the whole demo (data generation included) under ``benchmarks/slow_cpu.py``, which
pauses and resumes the process group so that everything runs ``factor`` times slower. The curve
is AP50 on the demo's validation images against wall-clock minutes since the demo started (the
evaluations during training, from ``run/metrics.csv``). Writes ``curves.json``, ``curves.md``
and ``curves.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from nasfpn.core.machine import cpu_name

HERE = Path(__file__).resolve().parent


def run_demo(factor: float, out: Path, minutes: float) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "nasfpn", "demo", "--out", str(out), "--minutes", str(minutes)]
    if factor > 1:
        command = [sys.executable, str(HERE / "slow_cpu.py"), "--factor", str(factor), "--", *command]
    start = time.time()
    with open(out / "demo.log", "w") as log:
        rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    return {"rc": rc, "wall_s": round(time.time() - start, 1)}


def read_run(out: Path) -> dict:
    """The evaluations of a finished demo folder, with the start-up before training added."""
    log = (out / "demo.log").read_text() if (out / "demo.log").is_file() else ""
    points, per_step = [], []
    metrics_csv = out / "run" / "metrics.csv"
    previous_step = 0
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            if not row.get("AP50") and row.get("epoch_seconds") and step > previous_step:
                per_step.append(float(row["epoch_seconds"]) / (step - previous_step))  # no evaluation in it
            previous_step = step
            if row.get("AP50") and row.get("elapsed"):
                points.append(
                    {
                        "epoch": int(row["epoch"]),
                        "step": int(row["step"]),
                        "AP50": float(row["AP50"]),
                        "train_elapsed_s": float(row["elapsed"]),
                    }
                )
    final = re.search(r"AP ([0-9.]+), AP50 ([0-9.]+) \(target [0-9.]+ (reached|not reached)\) in ([0-9.]+) min", log)
    step_s = re.search(r"([0-9.]+) s per step", log)
    ready = re.search(r"ready in ([0-9]+) s", log)
    summary = json.loads((out / "run" / "summary.json").read_text())
    result = {
        "points": points,
        "steps": summary.get("steps"),
        "seconds_per_step_probe": float(step_s.group(1)) if step_s else None,
        # What a slow-down really was: training seconds per step, median over the epochs without an evaluation.
        "seconds_per_step": round(sorted(per_step)[len(per_step) // 2], 3) if per_step else None,
        "data_seconds": float(ready.group(1)) if ready else None,
    }
    if final:
        result.update(
            AP=float(final.group(1)),
            AP50=float(final.group(2)),
            reached=final.group(3) == "reached",
            demo_minutes=float(final.group(4)),
        )
    return result


def write_outputs(results: dict[str, dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {"cpu": cpu_name(), "python": platform.python_version()}
    (out / "curves.json").write_text(json.dumps({"machine": meta, "runs": results}, indent=1))
    lines = [
        f"CPU: {meta['cpu']}; slow-down emulated with benchmarks/slow_cpu.py",
        "",
        "| slow-down | steps | s/step (probe / training) | AP50 at (training minutes) | final AP / AP50 | demo minutes "
        "| target |",
        "|---|---|---|---|---|---|---|",
    ]
    for factor, r in results.items():
        curve = ", ".join(f"{p['AP50']:.3f} ({p['train_elapsed_s'] / 60:.1f})" for p in r["points"])
        lines.append(
            f"| {factor}x | {r.get('steps')} | {r.get('seconds_per_step_probe')} / {r.get('seconds_per_step')} | {curve} | "
            f"{r.get('AP', float('nan')):.3f} / {r.get('AP50', float('nan')):.3f} | {r.get('demo_minutes')} | "
            f"{'reached' if r.get('reached') else 'not reached'} |"
        )
    (out / "curves.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for factor, r in results.items():
        offset = (r.get("data_seconds") or 0.0) / 60
        xs = [offset + p["train_elapsed_s"] / 60 for p in r["points"]]
        label = "this CPU" if float(factor) == 1 else f"{factor}x slower (emulated)"
        ax.plot(xs, [p["AP50"] for p in r["points"]], marker="o", label=label)
    ax.axhline(0.8, color="grey", linestyle="--", linewidth=1)
    ax.axvline(10, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("minutes: data generation + training (the timing probes left out)")
    ax.set_ylabel("AP50 (500 validation images)")
    ax.set_title(f"nasfpn demo, time to accuracy ({meta['cpu']})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factors", type=float, nargs="*", default=[1.0, 2.0, 4.0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=Path("runs/demo_curves"))
    parser.add_argument("--from", dest="existing", nargs="*", default=[], help="FACTOR=DIR of finished demo runs")
    args = parser.parse_args()
    results: dict[str, dict] = {}
    for item in args.existing:
        factor, _, folder = item.partition("=")
        results[factor] = read_run(Path(folder))
    if not args.existing:
        for factor in args.factors:
            key = f"{factor:g}"
            folder = args.out / f"x{key}"
            status = run_demo(factor, folder, args.minutes)
            results[key] = {**read_run(folder), **status}
    write_outputs(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
