"""What this machine is, for benchmark records and per-machine caches."""

from __future__ import annotations

import platform
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
