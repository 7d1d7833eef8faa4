"""What this machine is, for benchmark records and per-machine caches."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def _cpuinfo() -> list[tuple[str, str]]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:  # not Linux
        return []
    return [(key.strip(), value.strip()) for key, _, value in (line.partition(":") for line in text.splitlines())]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere what ``platform`` knows)."""
    name = next((value for key, value in _cpuinfo() if key == "model name"), "")
    return name or platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> set[str]:
    """The first CPU's feature flags (``flags`` on x86, ``Features`` on ARM); empty where unknown."""
    return next((set(value.split()) for key, value in _cpuinfo() if key in ("flags", "Features")), set())


def process_start_time() -> float | None:
    """When this process started, as ``time.time()`` seconds (Linux ``/proc``; None elsewhere or if
    implausible): a time budget of a command starts there, before its imports."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22, starttime: clock ticks after boot
        boot = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        started = boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    # btime has whole seconds and the wall clock may have been set since boot: only a start in the
    # last hour (up to a second ahead) is believed.
    return started if -1.0 <= time.time() - started < 3600.0 else None
