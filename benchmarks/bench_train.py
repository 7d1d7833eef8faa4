"""Training step time and peak memory: precision, channels-last, NAS-FPN activation checkpointing.

    python benchmarks/bench_train.py                         # CPU, 2 threads, batch 2, 640x640
    python benchmarks/bench_train.py --device cuda --batch 8 # GPU recipe (crop 640, batch 8)

One step = the trainer's step, ``engine.step.train_step`` (what ``nasfpn train`` runs): forward
under autocast, loss (8 random boxes per image), backward, gradient norm (clipped when the
config's ``train.grad_clip`` > 0), finiteness check with BN buffer backup, SGD update (the
trainer's parameter groups; fused on CUDA). Each variant runs in its own fresh process
(``nasfpn bench --mode train --json``), so peak memory is not polluted by the other variants'
allocations; the rounds alternate the variants, and the table shows medians over rounds. Memory
(see nasfpn/apps/bench.py): "step memory" is the rise of the bytes in use during one step (CPU:
glibc malloc in use, sampled every 2 ms; CUDA: max allocated), "peak RSS" the whole process.

The training-step tables in RESULTS.md were measured before bench timed the trainer's step, on
a lighter one: forward, loss, backward and SGD update only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from harness import cpu_supports_bf16, markdown_table

VARIANTS = {
    "fp32": [],
    "fp32 CL": ["--channels-last"],
    "bf16 autocast": ["--precision", "bf16"],
    "bf16 autocast CL": ["--precision", "bf16", "--channels-last"],
    "fp32 checkpoint stacks": ["--checkpoint-stacks"],
}


def run_variant(model: str, extra: list[str], args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "nasfpn.cli",
        "bench",
        model,
        "--mode",
        "train",
        "--device",
        args.device,
        "--batch",
        str(args.batch),
        "--size",
        str(args.size),
        "--warmup",
        str(args.warmup),
        "--iters",
        str(args.iters),
        "--threads",
        str(args.threads),
        "--json",
        *extra,
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["retinanet_r50_nasfpn_crop640_50e", "retinanet_r50_fpn_crop640_50e"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--json", help="also write the raw results here")
    args = p.parse_args()

    variants = [v for v in args.variants if "bf16" not in v or args.device.startswith("cuda") or cpu_supports_bf16()]
    results: dict[tuple[str, str], list[dict]] = {}
    loads = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for model in args.models:
            for name in variants:
                if "checkpoint" in name and "nasfpn" not in model:
                    continue
                results.setdefault((model, name), []).append(run_variant(model, VARIANTS[name], args))
    loads.append(os.getloadavg()[0])

    env = next(iter(results.values()))[0]["env"]
    print(
        f"# Training step: {args.device}, {args.threads} threads, batch {args.batch}, {args.size}x{args.size}, "
        f"{args.rounds} rounds x {args.iters} steps (medians)"
    )
    print(
        f"torch {env['torch']}, {env.get('gpu') or env['cpu']}, {env['cpu_capability']}; "
        f"load average {loads[0]:.1f} -> {loads[1]:.1f}; memory: {next(iter(results.values()))[0]['memory_source']}\n"
    )
    rows = []
    for model in args.models:
        base = None
        for name in variants:
            runs = results.get((model, name))
            if not runs:
                continue
            step = statistics.median(r["p50_ms"] for r in runs)
            peak = statistics.median(r["peak_mb"] for r in runs)
            alloc = [r["alloc_delta_mb"] for r in runs if r.get("alloc_delta_mb") is not None]
            alloc_delta = statistics.median(alloc) if alloc else None
            base = base or (step, peak, alloc_delta)
            rows.append(
                {
                    "model": model.replace("retinanet_", "").replace("_crop640_50e", ""),
                    "variant": name,
                    "step_ms": step,
                    "images_per_s": args.batch / step * 1e3,
                    "vs_fp32": step / base[0],
                    "peak_mb": peak,
                    "alloc_delta_mb": alloc_delta,
                    "alloc_vs_fp32": alloc_delta / base[2] if alloc_delta and base[2] else None,
                }
            )
    print(
        markdown_table(
            rows,
            [
                ("model", "model"),
                ("variant", "variant"),
                ("step_ms", "step ms"),
                ("images_per_s", "images/s"),
                ("vs_fp32", "x fp32"),
                ("peak_mb", "peak RSS MB"),
                ("alloc_delta_mb", "step memory MB"),
                ("alloc_vs_fp32", "step memory x fp32"),
            ],
        )
    )
    print(
        "\nstep memory: peak rise of malloc'd bytes in use during one step (CUDA: max allocated rise), i.e.\n"
        "activations, gradients, optimizer temporaries; peak RSS: the whole process."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "loads": loads,
                    "rows": rows,
                    "runs": {f"{m}|{n}": r for (m, n), r in results.items()},
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
