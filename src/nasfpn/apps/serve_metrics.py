"""The server's counters in the Prometheus text exposition format (version 0.0.4).

A small hand-written registry rather than a dependency: counters with labels, histograms and
gauges are all the server needs, and the format is plain text (``# HELP`` / ``# TYPE`` lines,
then ``name{label="value"} number`` samples; a histogram's buckets are cumulative and end with
``le="+Inf"``, followed by ``_sum`` and ``_count``). Every update happens on the event loop's
thread, so no lock is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds: the request latency histogram's upper bounds."""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if math.isnan(x):
        return "NaN"
    return repr(int(x)) if float(x).is_integer() and abs(x) < 2**53 else repr(float(x))


class CounterVec:
    """A counter per combination of label values."""

    def __init__(self, name: str, help: str, labels: Sequence[str]) -> None:
        self.name, self.help, self.labels = name, help, tuple(labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *values: str, by: float = 1.0) -> None:
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name} takes {len(self.labels)} label values {self.labels}, got {values}")
        self.values[values] = self.values.get(values, 0.0) + by

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_labels(self.labels, k)} {_number(v)}" for k, v in sorted(self.values.items())]
        return lines


class HistogramVec:
    """A histogram per combination of label values, with fixed upper bounds."""

    def __init__(self, name: str, help: str, buckets: Sequence[float], labels: Sequence[str] = ()) -> None:
        if list(buckets) != sorted(set(buckets)):
            raise ValueError(f"histogram buckets must increase strictly, got {buckets}")
        self.name, self.help, self.labels = name, help, tuple(labels)
        self.buckets = tuple(float(b) for b in buckets)
        self.series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def observe(self, value: float, *values: str) -> None:
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name} takes {len(self.labels)} label values {self.labels}, got {values}")
        counts, total = self.series.setdefault(values, ([0] * (len(self.buckets) + 1), [0.0]))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
        total[0] += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, (counts, total) in sorted(self.series.items()):
            cumulative = 0
            for bound, n in zip((*self.buckets, math.inf), counts):
                cumulative += n
                le = f'le="{"+Inf" if math.isinf(bound) else repr(bound)}"'  # "1.0", as the reference client writes
                lines.append(f"{self.name}_bucket{_labels(self.labels, key, le)} {cumulative}")
            lines.append(f"{self.name}_sum{_labels(self.labels, key)} {_number(total[0])}")
            lines.append(f"{self.name}_count{_labels(self.labels, key)} {cumulative}")
        return lines


class Gauge:
    """A value read when the metrics are rendered (``kind="counter"`` for a count kept elsewhere)."""

    def __init__(
        self,
        name: str,
        help: str,
        read: Callable[[], float],
        labels: dict[str, str] | None = None,
        kind: str = "gauge",
    ) -> None:
        if kind not in ("gauge", "counter"):
            raise ValueError(f"kind must be 'gauge' or 'counter', got {kind!r}")
        self.name, self.help, self.read, self.kind = name, help, read, kind
        self.labels = dict(labels or {})

    def render(self) -> list[str]:
        sample = f"{self.name}{_labels(list(self.labels), list(self.labels.values()))} {_number(self.read())}"
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}", sample]


def render(metrics: Sequence[CounterVec | HistogramVec | Gauge]) -> str:
    """The exposition text of ``metrics``, in order."""
    return "\n".join(line for m in metrics for line in m.render()) + "\n"
