"""``precision="auto"``: the faster precision of the fast path on this machine, measured once.

    choice = choose_precision(model, config, batch_size=4)
    print(choice.describe())   # precision auto: bf16 (fp32 212 ms, bf16 81 ms per batch of 4 at 640x640 ...)

Whether bf16 pays depends on the CPU, not on a rule: on an AMD EPYC with AVX512-BF16 the bf16 fast
path ran 2.6x faster than fp32, on an Intel Xeon without AMX 1.41x slower. So ``auto`` times the
fast path (``deploy.fast.optimize_for_inference``) of the actual model at the config's input size
(``image_size`` square, padded) and the batch size used: fp32 and bf16 on CPU; fp32, fp16 and bf16
(where supported) on CUDA. A couple of warm-up calls each, then timed calls in alternating order
(a shared CPU drifts), about ``budget_s`` in all, at least one timed call each. A reduced precision
is kept only when its median is at least ``min_gain`` (10%) below fp32's: never a path slower than
fp32, and no changed numerics for a marginal gain.

The choice is cached in ``<cache dir>/precision.json`` (``core.weights.cache_dir``: ``$NASFPN_CACHE``
or ``~/.cache/nasfpn``), keyed by what changes the answer: the CPU (model name and its bf16 / AMX
flags), the thread count, the torch version, the device (CUDA device name), the architecture (a
hash of the config's model section without the test-time thresholds), the input size, the batch
size and the fast-path options. A file that cannot be read is ignored and rewritten. Times taken
while other processes held the CPU (this process got under 70% of its threads' time) choose for
this run only and are not cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from nasfpn.core.config import Config, config_to_dict
from nasfpn.core.fileio import write_json_atomic
from nasfpn.core.machine import cpu_flags, cpu_name
from nasfpn.core.weights import cache_dir
from nasfpn.data.transforms import round_up
from nasfpn.deploy.fast import InferenceModel, optimize_for_inference
from nasfpn.models import RetinaNet

AUTO = "auto"
MIN_GAIN = 0.10
"""A reduced precision must take at least this much less time than fp32 to be chosen."""
BUDGET_S = 4.0
BUSY_SHARE = 0.7
"""On CPU, timings taken while this process got less than this share of its threads' time (other
processes competing) are used for this run but not cached: the next run measures again."""
CACHE_NAME = "precision.json"
CACHE_VERSION = 1
MAX_ENTRIES = 64
# CPU flags that decide whether bf16 / fp16 dot products run natively (Linux /proc/cpuinfo names).
_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_fp16")


@dataclass
class Timings:
    """What ``measure`` found: median ms per batch, the modules it built, and (CPU) the share of its
    threads' time the process got while timing (1.0: nothing else competed)."""

    ms: dict[str, float]
    runners: dict[str, InferenceModel]
    cpu_share: float | None = None


@dataclass(frozen=True)
class PrecisionChoice:
    """What ``auto`` chose, from which times (median ms per batch), measured now or read from the cache."""

    precision: str
    ms: dict[str, float]
    batch_size: int
    input_hw: tuple[int, int]
    machine: str
    threads: int
    cached: bool
    cache_path: Path | None
    min_gain: float = MIN_GAIN
    cpu_share: float | None = None
    """CPU time share while measuring now (None: cached, or not a CPU)."""
    runner: InferenceModel | None = field(default=None, repr=False, compare=False)
    """The winner's fast-path module when it was measured now (saves building it again)."""

    def describe(self) -> str:
        """One line: the choice, the times it rests on, where, and whether measured now or cached."""
        times = ", ".join(f"{p} {_fmt_ms(ms)}" for p, ms in self.ms.items())
        base = self.ms.get("fp32")
        if self.precision != "fp32" and base:
            why = f"{base / self.ms[self.precision]:.2f}x faster than fp32"
        elif len(self.ms) > 1:
            why = f"no reduced precision >= {self.min_gain:.0%} faster"
        else:
            why = "the only candidate here"
        h, w = self.input_hw
        where = f"{self.machine}, {self.threads} thread(s)" if self.machine.startswith("cpu") else self.machine
        source = f"cached in {self.cache_path}" if self.cached else "measured now"
        if not self.cached and self.cpu_share is not None and self.cpu_share < BUSY_SHARE:
            source += f" on a busy CPU ({self.cpu_share:.0%} of {self.threads} thread(s)), not cached"
        saved = "" if self.cached or self.cache_path is None else f", saved to {self.cache_path}"
        return (
            f"precision auto: {self.precision}, {why} ({times} per batch of {self.batch_size} at {h}x{w} "
            f"on {where}; {source}{saved})"
        )


def _fmt_ms(ms: float) -> str:
    return f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"


# --------------------------------------------------------------------------- what the answer depends on


def _cpu_info() -> tuple[str, list[str]]:
    """The CPU's model name and which of the flags that matter for bf16 it has."""
    flags = cpu_flags()
    return cpu_name(), [f for f in _CPU_FLAGS if f in flags]


def candidates(device: torch.device) -> tuple[str, ...]:
    """The precisions ``auto`` compares on ``device`` (fp32 first)."""
    if device.type == "cuda":
        return ("fp32", "fp16", "bf16") if torch.cuda.is_bf16_supported() else ("fp32", "fp16")
    if device.type == "cpu":
        return ("fp32", "bf16")
    return ("fp32",)


def machine_description(device: torch.device) -> str:
    """``cpu <model name>`` or ``cuda <device name>``: the place the times were taken."""
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"cpu {_cpu_info()[0]}"
    return device.type


def model_digest(config: Config) -> str:
    """A short hash of the architecture: the config's model section without the test-time
    thresholds (they change post-processing, not the network's speed)."""
    section = config_to_dict(dataclasses.replace(config.model, test=type(config.model.test)()))
    return hashlib.sha256(json.dumps(section, sort_keys=True).encode()).hexdigest()[:16]


def input_hw(config: Config) -> tuple[int, int]:
    """The network input of a square image of ``image_size``: the size ``auto`` measures."""
    side = round_up(config.data.image_size, config.data.pad_divisor)
    return side, side


def cache_key(
    config: Config, device: torch.device, batch_size: int, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Everything that changes which precision is fastest (JSON-able)."""
    cpu, flags = _cpu_info()
    return {
        "cpu": cpu,
        "cpu_flags": flags,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": machine_description(device),
        "model": model_digest(config),
        "input": list(input_hw(config)),
        "batch_size": int(batch_size),
        "options": dict(sorted((options or {}).items())),
    }


def _key_id(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


# --------------------------------------------------------------------------- the cache file


def cache_path() -> Path:
    return cache_dir() / CACHE_NAME


def _read_cache(path: Path) -> dict[str, Any]:
    """The cache's entries; an unreadable, corrupt or foreign file counts as empty (it is rewritten)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def _valid_entry(entry: Any, key: dict[str, Any], allowed: Sequence[str]) -> bool:
    return (
        isinstance(entry, dict)
        and entry.get("key") == key
        and entry.get("precision") in allowed
        and isinstance(entry.get("ms"), dict)
        and all(p in allowed and isinstance(v, (int, float)) for p, v in entry["ms"].items())
    )


def _write_cache(path: Path, entries: dict[str, Any]) -> bool:
    """Write ``entries`` (the newest ``MAX_ENTRIES``); False if the folder is not writable."""
    newest = sorted(entries.items(), key=lambda kv: str(kv[1].get("measured_at", "")))[-MAX_ENTRIES:]
    try:
        write_json_atomic({"version": CACHE_VERSION, "entries": dict(newest)}, path)
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(
    model: RetinaNet,
    hw: tuple[int, int],
    batch_size: int,
    precisions: Sequence[str],
    budget_s: float = BUDGET_S,
    options: dict[str, Any] | None = None,
    timer: Callable[[], float] = time.perf_counter,
    max_calls: int = 15,
) -> Timings:
    """Median ms per batch of the fast path at each precision, and the fast-path modules built.

    Two warm-up calls each (one when a call takes over a tenth of the budget), then rounds of one
    timed call per precision, in alternating order, until ``budget_s`` has passed since the start
    or ``max_calls`` rounds are done; at least one round. On CPU it also records the share of its
    threads' time the process got during the timed rounds.
    """
    device = next(model.parameters()).device
    images = torch.randn((batch_size, 3, *hw), generator=torch.Generator().manual_seed(0)).to(device)
    runners = {p: optimize_for_inference(model, precision=p, **(options or {})) for p in precisions}
    start = timer()

    def call(p: str) -> float:
        _sync(device)
        t0 = timer()
        runners[p](images)
        _sync(device)
        return timer() - t0

    for p in precisions:
        if call(p) < budget_s / 10:
            call(p)
    samples: dict[str, list[float]] = {p: [] for p in precisions}
    wall0, cpu0 = timer(), time.process_time()
    for r in range(max_calls):
        for p in precisions if r % 2 == 0 else precisions[::-1]:
            samples[p].append(call(p))
        if timer() - start >= budget_s:
            break
    wall = timer() - wall0
    share = (time.process_time() - cpu0) / (wall * torch.get_num_threads()) if wall > 0 else 1.0
    ms = {p: 1000 * statistics.median(s) for p, s in samples.items()}
    return Timings(ms, runners, min(share, 1.0) if device.type == "cpu" else None)


def pick(ms: dict[str, float], min_gain: float = MIN_GAIN) -> str:
    """The fastest precision, a reduced one only if it takes at least ``min_gain`` less time than fp32."""
    base = ms["fp32"]
    faster = {p: t for p, t in ms.items() if p != "fp32" and t <= (1 - min_gain) * base}
    return min(faster, key=lambda p: faster[p]) if faster else "fp32"


def choose_precision(
    model: RetinaNet,
    config: Config,
    batch_size: int = 1,
    options: dict[str, Any] | None = None,
    budget_s: float = BUDGET_S,
    min_gain: float = MIN_GAIN,
    use_cache: bool = True,
    measure_fn: Callable[..., Timings] | None = None,
) -> PrecisionChoice:
    """The precision of ``model``'s fast path to run here: from the cache, else measured (and cached).

    ``options``: the other ``optimize_for_inference`` arguments (``fuse_bn``, ``channels_last``);
    ``compile`` is not measured (it would compile every candidate). It measures on the device
    ``model`` is on. The winner's module comes back in ``runner`` when it was measured now.
    ``measure_fn`` replaces ``measure`` (same arguments and result).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    options = {k: v for k, v in (options or {}).items() if k not in ("precision", "compile")}
    allowed = candidates(device)
    hw = input_hw(config)
    machine = machine_description(device)
    threads = torch.get_num_threads()

    def choice(
        precision: str, ms: dict[str, float], cached: bool, path: Path | None, share=None, runner=None
    ) -> PrecisionChoice:
        return PrecisionChoice(precision, ms, batch_size, hw, machine, threads, cached, path, min_gain, share, runner)

    if len(allowed) == 1:
        return choice(allowed[0], {}, False, None)
    key = cache_key(config, device, batch_size, options)
    key_id = _key_id(key)
    path = cache_path()
    entries = _read_cache(path) if use_cache else {}
    entry = entries.get(key_id)
    if _valid_entry(entry, key, allowed):
        assert entry is not None
        ms = {p: float(v) for p, v in entry["ms"].items()}
        return choice(entry["precision"], ms, True, path)
    timings = (measure_fn or measure)(model, hw, batch_size, allowed, budget_s, options)
    ms = timings.ms
    chosen = pick(ms, min_gain)
    saved: Path | None = None
    busy = timings.cpu_share is not None and timings.cpu_share < BUSY_SHARE
    if use_cache and not busy:
        entries[key_id] = {
            "key": key,
            "precision": chosen,
            "ms": {p: round(v, 3) for p, v in ms.items()},
            "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        saved = path if _write_cache(path, entries) else None
    return choice(chosen, ms, False, saved, timings.cpu_share, timings.runners.get(chosen))
