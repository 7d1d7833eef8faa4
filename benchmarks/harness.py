"""What the scripts in ``benchmarks/`` share: side-by-side timing, its command-line options, tables,
the resume of a study file.

The scripts run as ``python benchmarks/<script>.py``; Python puts the script's folder first on
``sys.path``, so ``import harness`` works from any current directory. The measurements that
``nasfpn bench`` makes too (``infer_step``, ``percentile``, ``environment``, ``calibrate_scores``,
...) stay in ``nasfpn.apps.bench`` and the scripts import them from there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Timings = dict[str, dict[str, list[float]]]


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> Timings:
    """Time every function once per round, round-robin, so that changes in machine load hit all
    of them alike. A function may return a dict of its own sub-timings (seconds); any other
    return value is ignored.

    Returns ``{name: {"total": [seconds per round], <sub-timing>: [...]}}``.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: Timings = {name: {"total": []} for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            a = time.perf_counter()
            parts = fn()
            out[name]["total"].append(time.perf_counter() - a)
            for key, value in parts.items() if isinstance(parts, dict) else ():
                out[name].setdefault(key, []).append(value)
    return out


def interleaved_with_load(
    fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1
) -> tuple[Timings, tuple[float, float]]:
    """``interleaved`` and the 1-minute load average before and after it."""
    before = os.getloadavg()[0]
    times = interleaved(fns, rounds, warmup)
    return times, (before, os.getloadavg()[0])


def median_ms(times: Timings, name: str, key: str = "total") -> float:
    """Median of one sub-timing of ``interleaved``'s result, in milliseconds."""
    return statistics.median(times[name][key]) * 1e3


def add_interleaved_args(parser: argparse.ArgumentParser) -> None:
    """Command-line options shared by the side-by-side inference benchmarks."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pairs-per-image", type=int, default=1000)
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 variant")


def cpu_supports_bf16() -> bool:
    """Whether the CPU has native bf16 dot products (AVX512-BF16 or AMX), per /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """``rows`` as a markdown table; ``columns`` are ``(key, header)``; floats get 1-3 decimals
    (small ones scientific)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            if v != 0 and abs(v) < 0.01:
                return f"{v:.1e}"
            return f"{v:.3f}" if abs(v) < 1 else f"{v:.1f}"
        return "" if v is None else str(v)

    out = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(out)


def kept_runs(out: Path, meta: dict[str, Any], genotypes: dict[str, str]) -> dict[str, Any]:
    """The runs of the study already in ``out`` (JSON: ``meta`` + ``runs`` keyed ``name|...``) that a
    resumed study keeps: all but those of a name whose genotype text changed or is gone. A study
    made with other ``meta`` (the settings) is refused: its figures would not compare."""
    if not out.is_file():
        return {}
    old = json.loads(out.read_text())
    if old.get("meta") != meta:
        raise SystemExit(f"{out} holds a study with other settings ({old.get('meta')}); use another --out")
    return {key: r for key, r in old.get("runs", {}).items() if genotypes.get(key.split("|")[0]) == r.get("genotype")}
