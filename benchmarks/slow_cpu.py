"""Run a command as if on a CPU ``--factor`` times slower: the whole process tree is paused and
resumed in a fixed duty cycle (SIGSTOP / SIGCONT to its process group), so every part of it (data
generation workers, training threads, evaluation, file writes) gets ``1 / factor`` of the wall time.

    python benchmarks/slow_cpu.py --factor 4 -- nasfpn demo --out runs/demo_slow4

Unlike fewer threads or ``taskset``, which change how the work is split, this slows every part by
the same factor, like a machine with slower cores. A 20 ms period is short against a training step
(0.1-0.5 s) and long against the cost of a signal. The command's exit status is returned.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time


def run_slowed(command: list[str], factor: float, period: float = 0.02) -> int:
    if factor < 1.0:
        raise ValueError(f"--factor must be >= 1, got {factor}")
    proc = subprocess.Popen(command, start_new_session=True)  # its own process group, children included
    run_s = period / factor
    stop_s = period - run_s
    try:
        while proc.poll() is None:
            time.sleep(run_s)
            if stop_s <= 0:
                continue
            try:
                os.killpg(proc.pid, signal.SIGSTOP)
                time.sleep(stop_s)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGCONT)
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGINT)
    except ProcessLookupError:
        pass
    return proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factor", type=float, default=4.0, help="slow-down factor (1: no slow-down)")
    parser.add_argument("--period", type=float, default=0.02, help="duty-cycle period in seconds")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    return run_slowed(command, args.factor, args.period)


if __name__ == "__main__":
    sys.exit(main())
