"""Run a command as if on a CPU ``--factor`` times slower: the whole process tree is paused and
resumed in a fixed duty cycle (SIGSTOP / SIGCONT to its process group), so every part of it (data
generation workers, training threads, evaluation, file writes) gets ``1 / factor`` of the wall time.

    python benchmarks/slow_cpu.py --factor 4 -- nasfpn demo --out runs/demo_slow4

Unlike fewer threads or ``taskset``, which change how the work is split, this slows every part by
the same factor, like a machine with slower cores. A 20 ms period is short against a training step
(0.1-0.5 s) and long against the cost of a signal. The command's exit status is returned.

The pauses are only as exact as this process's wake-ups: at normal priority a busy machine (the
command itself on every core, or any other work) delays them, and the command runs for longer
than its share, slower than 1x but less than ``factor``x (measured: factor 4 gave 3.1x). So this
process asks for real-time scheduling (``SCHED_FIFO``; root or CAP_SYS_NICE) and says so when it
cannot have it; check the measured slow-down (e.g. seconds per training step against a 1x run)
either way. Even so the factor is a duty cycle, not the slow-down: the work resumed after each
pause runs on cold caches, and on some days it costs more (measured on one day: factor 4 slowed
isolated demo steps 4.5x and the demo's training loop 5.2-5.5x; factor 3.5: 3.9x and 4.2x;
on an earlier day factor 4 gave 3.94x on a busy loop and 4.1x on the demo's steps).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time


def realtime_priority() -> bool:
    """Wake-ups on time on a busy machine: this process under ``SCHED_FIFO`` (its children, started
    afterwards, are put back to normal scheduling). False where that is not permitted."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (AttributeError, PermissionError, OSError):
        return False
    return True


def _normal_scheduling() -> None:
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def run_slowed(command: list[str], factor: float, period: float = 0.02) -> int:
    if factor < 1.0:
        raise ValueError(f"--factor must be >= 1, got {factor}")
    realtime = factor > 1.0 and realtime_priority()
    if factor > 1.0 and not realtime:
        print(
            "slow_cpu: no real-time priority (needs root or CAP_SYS_NICE): the pauses come late on a busy "
            "machine and the command runs less than --factor times slower; measure the slow-down",
            file=sys.stderr,
        )
    # Its own process group (children included), at normal priority again.
    proc = subprocess.Popen(command, start_new_session=True, preexec_fn=_normal_scheduling if realtime else None)
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
