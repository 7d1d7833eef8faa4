"""Load and soak test of ``nasfpn serve`` on loopback, bounded in requests and time.

    python benchmarks/load_test.py                      # starts a server with the tiny model
    python benchmarks/load_test.py --requests 2000 --concurrency 64 --burst-factor 4 --json out.json
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --pid PID   # a server already running

Phases: reference (every test picture once, one request at a time: the expected detections),
warm-up (``--concurrency`` requests), soak (``--requests`` at ``--concurrency`` connections, a mix
of sizes and formats, ``--bad-fraction`` bad uploads of several kinds), burst (``--burst-factor``
times the server's ``max_queue``, all at once), then the server's resident memory once idle.

Checks (exit status 1 when one fails):

- every good request is answered 200 with its reference detections (batching never changes a
  result), or refused with 503 / 504;
- every bad upload gets its own 4xx and error name (or 503 / 504: under overload a request is
  refused before its body is read);
- never a 500, a connection error or a hang (each request has a client timeout);
- the server's resident memory (RSS) after the burst is back within ``--rss-tolerance`` of its
  value after the warm-up.

Prints counts by status, p50 / p99 latency and throughput per phase. The default model is the
tests' deterministic ``nasfpn_tiny`` at 256 px (``tests/deploy_helpers.py``: random weights set
so that every image gives ~100 boxes after NMS), served with one torch thread.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(120, 160), (240, 320), (480, 640), (320, 240), (100, 300), (256, 256)]
"""(H, W) of the test pictures: landscape, portrait, square and 3:1 (two padded input shapes)."""
REFUSED = {503, 504}


@dataclass(frozen=True)
class Picture:
    name: str
    data: bytes
    content_type: str


@dataclass(frozen=True)
class BadUpload:
    kind: str
    status: int
    error: str
    files: dict[str, tuple[str, bytes, str]] | None
    data: dict[str, str] | None = None
    params: dict[str, str] | None = None


@dataclass
class Outcome:
    phase: str
    kind: str
    status: int
    """HTTP status; 0 for a connection error or a client timeout."""
    seconds: float
    ok: bool
    problem: str = ""


@dataclass
class LoadConfig:
    requests: int = 2000
    concurrency: int = 64
    bad_fraction: float = 0.1
    burst_factor: float = 4.0
    high_thr_fraction: float = 0.2
    """Share of good requests sent with score_thr=0.3 (the others use the model's default)."""
    seed: int = 0
    client_timeout: float = 120.0
    max_seconds: float = 300.0
    """Soak and burst stop issuing requests past this (the report says so)."""
    rss_tolerance: float = 0.10
    settle_seconds: float = 15.0
    max_upload_mb: float = 2.0
    pictures_per_size: int = 2
    backoff_s: float = 0.1
    """A soak worker pauses up to this long after a 503 / 504 before its next request, as a client
    should (Retry-After gives whole seconds: too coarse for a test at this scale)."""


# --------------------------------------------------------------------------- inputs
def pictures(per_size: int = 2, seed: int = 11) -> list[Picture]:
    """Synthetic scenes of every size in ``SIZES``, alternately PNG and JPEG."""
    from nasfpn.data.synthetic import SyntheticSpec, render_image

    out = []
    for h, w in SIZES:
        spec = SyntheticSpec(image_size=(h, w), max_objects=6)
        for i in range(per_size):
            image = render_image(spec, seed=seed, split="val", index=i)[0]
            fmt = ("PNG", "JPEG")[len(out) % 2]
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            out.append(Picture(f"{h}x{w}_{i}.{fmt.lower()}", buf.getvalue(), f"image/{fmt.lower()}"))
    return out


def _png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(16)))


def bad_uploads(good: Picture, max_upload_mb: float) -> list[BadUpload]:
    """One of each kind of bad request, with the status and error name the server must answer."""
    oversized = np.random.default_rng(0).integers(0, 256, int(max_upload_mb * 2**20) + 4096, dtype=np.uint8)
    return [
        BadUpload(
            "truncated", 400, "undecodable_image", {"file": ("cut.png", good.data[: len(good.data) // 2], "image/png")}
        ),
        BadUpload("not_an_image", 415, "not_an_image", {"file": ("table.csv", b"name,score\nfoo,1\n", "text/csv")}),
        BadUpload("empty", 400, "empty_upload", {"file": ("empty.png", b"", "image/png")}),
        BadUpload(
            "huge_pixels", 413, "image_too_large", {"file": ("huge.png", _png_declaring(60000, 60000), "image/png")}
        ),
        BadUpload("oversized", 413, "upload_too_large", {"file": ("big.png", oversized.tobytes(), "image/png")}),
        BadUpload("no_file", 422, "invalid_request", None, data={"score_thr": "0.2"}),
        BadUpload(
            "bad_threshold",
            422,
            "invalid_request",
            {"file": (good.name, good.data, good.content_type)},
            params={"score_thr": "2"},
        ),
    ]


# --------------------------------------------------------------------------- checks
def same_detections(got: list[dict], want: list[dict]) -> str:
    """'' when ``got`` equals ``want`` up to float noise, else what differs."""
    if len(got) != len(want):
        return f"{len(got)} detections, expected {len(want)}"
    for a, b in zip(sorted(got, key=lambda d: -d["score"]), sorted(want, key=lambda d: -d["score"])):
        if a["label"] != b["label"] or abs(a["score"] - b["score"]) > 2e-5:
            return f"detection {a} differs from {b}"
        if not np.allclose(a["box"], b["box"], atol=2e-3):
            return f"box {a['box']} differs from {b['box']}"
    return ""


async def _good(client: httpx.AsyncClient, pic: Picture, thr: float | None, refs: dict, phase: str) -> Outcome:
    params = {"score_thr": str(thr)} if thr is not None else None
    t0 = time.perf_counter()
    try:
        r = await client.post("/predict", files={"file": (pic.name, pic.data, pic.content_type)}, params=params)
    except httpx.HTTPError as e:
        return Outcome(phase, "good", 0, time.perf_counter() - t0, False, f"{type(e).__name__}: {e}")
    seconds = time.perf_counter() - t0
    if r.status_code in REFUSED:
        return Outcome(phase, "good", r.status_code, seconds, _named(r, {"overloaded", "deadline_exceeded"}) == "")
    if r.status_code != 200:
        return Outcome(phase, "good", r.status_code, seconds, False, r.text[:200])
    want = refs.get((pic.name, thr))
    problem = "" if want is None else same_detections(r.json()["detections"], want)
    return Outcome(phase, "good", 200, seconds, not problem, problem)


def _named(r: httpx.Response, names: set[str]) -> str:
    try:
        error = r.json().get("error")
    except ValueError:
        return f"not JSON: {r.text[:100]!r}"
    return "" if error in names else f"error {error!r}, expected one of {sorted(names)}"


async def _bad(client: httpx.AsyncClient, bad: BadUpload, phase: str) -> Outcome:
    t0 = time.perf_counter()
    try:
        r = await client.post("/predict", files=bad.files, data=bad.data, params=bad.params)
    except httpx.HTTPError as e:
        return Outcome(phase, bad.kind, 0, time.perf_counter() - t0, False, f"{type(e).__name__}: {e}")
    seconds = time.perf_counter() - t0
    if r.status_code in REFUSED:
        return Outcome(phase, bad.kind, r.status_code, seconds, _named(r, {"overloaded", "deadline_exceeded"}) == "")
    if r.status_code != bad.status:
        return Outcome(phase, bad.kind, r.status_code, seconds, False, f"expected {bad.status}: {r.text[:200]}")
    problem = _named(r, {bad.error})
    return Outcome(phase, bad.kind, r.status_code, seconds, not problem, problem)


# --------------------------------------------------------------------------- server
def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_weights(path: Path) -> Path:
    """The tests' deterministic ``nasfpn_tiny`` (256 px) as our .safetensors."""
    sys.path.insert(0, str(ROOT / "tests"))
    from deploy_helpers import save_tiny_weights

    return save_tiny_weights(path)


def start_server(weights: Path, port: int, log: Path, extra: list[str], threads: int = 1) -> subprocess.Popen:
    """``nasfpn serve`` on 127.0.0.1:``port``; returns once ``/health`` answers."""
    # fp32: the check that batching never changes a result needs exact arithmetic (a command line
    # that times bf16 against fp32 may pick bf16, whose results shift with the batch a request joins).
    env = {"NASFPN_PRECISION": "fp32", **os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nasfpn", "serve", "-", "--weights", str(weights), "--port", str(port), *extra],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


# --------------------------------------------------------------------------- phases
def _summary(outcomes: list[Outcome], seconds: float) -> dict[str, Any]:
    by_status = Counter(str(o.status) for o in outcomes)
    by_kind = Counter(f"{o.kind}:{o.status}" for o in outcomes)
    lat = np.array([o.seconds for o in outcomes]) if outcomes else np.zeros(1)
    ok200 = (
        np.array([o.seconds for o in outcomes if o.status == 200]) if any(o.status == 200 for o in outcomes) else None
    )
    return {
        "requests": len(outcomes),
        "seconds": round(seconds, 2),
        "by_status": dict(sorted(by_status.items())),
        "by_kind": dict(sorted(by_kind.items())),
        "throughput_rps": round(len(outcomes) / seconds, 1) if seconds > 0 else None,
        "answered_200_per_s": round(by_status.get("200", 0) / seconds, 1) if seconds > 0 else None,
        "latency_ms": {
            "p50": round(float(np.percentile(lat, 50)) * 1e3, 1),
            "p99": round(float(np.percentile(lat, 99)) * 1e3, 1),
        },
        "latency_200_ms": None
        if ok200 is None
        else {
            "p50": round(float(np.percentile(ok200, 50)) * 1e3, 1),
            "p99": round(float(np.percentile(ok200, 99)) * 1e3, 1),
        },
    }


def _progress(phase: str, summary: dict[str, Any]) -> None:
    print(
        f"[{phase}] {summary['requests']} requests in {summary['seconds']} s: {summary['by_status']}", file=sys.stderr
    )


class Load:
    """One run of the phases against ``url`` (a server process ``pid`` on this machine, for RSS)."""

    def __init__(self, url: str, pid: int | None, cfg: LoadConfig) -> None:
        self.url, self.pid, self.cfg = url, pid, cfg
        self.rng = random.Random(cfg.seed)
        self.pics = pictures(cfg.pictures_per_size)
        self.bad = bad_uploads(self.pics[0], cfg.max_upload_mb)
        self.refs: dict[tuple[str, float | None], list[dict]] = {}
        self.started = time.monotonic()
        self.stopped_early: list[str] = []
        self.rss_peak = 0

    def _client(self, connections: int) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.AsyncClient(base_url=self.url, timeout=self.cfg.client_timeout, limits=limits)

    def _request(self, client: httpx.AsyncClient, phase: str):
        if self.rng.random() < self.cfg.bad_fraction:
            return _bad(client, self.rng.choice(self.bad), phase)
        thr = 0.3 if self.rng.random() < self.cfg.high_thr_fraction else None
        return _good(client, self.rng.choice(self.pics), thr, self.refs, phase)

    async def references(self) -> list[Outcome]:
        outcomes = []
        async with self._client(1) as client:
            for pic in self.pics:
                for thr in (None, 0.3):
                    params = {"score_thr": str(thr)} if thr is not None else None
                    r = await client.post(
                        "/predict", files={"file": (pic.name, pic.data, pic.content_type)}, params=params
                    )
                    if r.status_code != 200:
                        raise RuntimeError(f"reference request for {pic.name} failed: {r.status_code} {r.text[:300]}")
                    self.refs[(pic.name, thr)] = r.json()["detections"]
                    outcomes.append(Outcome("reference", "good", 200, r.elapsed.total_seconds(), True))
            for bad in self.bad:  # alone, each bad kind gets exactly its error
                outcomes.append(await _bad(client, bad, "reference"))
        return outcomes

    def _time_left(self) -> bool:
        return time.monotonic() - self.started < self.cfg.max_seconds

    async def pool(self, phase: str, n: int, concurrency: int) -> list[Outcome]:
        """``n`` requests over ``concurrency`` connections, each worker sending its next when answered."""
        outcomes: list[Outcome] = []
        remaining = [n]
        async with self._client(concurrency) as client:

            async def worker() -> None:
                while remaining[0] > 0:
                    if not self._time_left():
                        if phase not in self.stopped_early:
                            self.stopped_early.append(phase)
                        return
                    remaining[0] -= 1
                    outcome = await self._request(client, phase)
                    outcomes.append(outcome)
                    if outcome.status in REFUSED:
                        await asyncio.sleep(self.cfg.backoff_s * self.rng.random())

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return outcomes

    async def burst(self, n: int) -> list[Outcome]:
        """``n`` requests sent at once, each on its own connection."""
        async with self._client(n) as client:
            return list(await asyncio.gather(*(self._request(client, "burst") for _ in range(n))))

    async def sample_rss(self, stop: asyncio.Event) -> None:
        while self.pid is not None and not stop.is_set():
            self.rss_peak = max(self.rss_peak, rss_bytes(self.pid))
            await asyncio.sleep(0.2)

    async def idle_rss(self, baseline: int) -> int:
        """RSS once the server is idle: polled until within tolerance of ``baseline`` or settle time."""
        assert self.pid is not None
        deadline = time.monotonic() + self.cfg.settle_seconds
        async with self._client(1) as client:
            while True:
                health = (await client.get("/health")).json()
                rss = rss_bytes(self.pid)
                idle = health["in_flight"] == 0 and health["queued"] == 0
                if (idle and rss <= baseline * (1 + self.cfg.rss_tolerance)) or time.monotonic() > deadline:
                    return rss
                await asyncio.sleep(0.5)

    async def run(self) -> dict[str, Any]:
        cfg = self.cfg
        async with self._client(1) as client:
            health = (await client.get("/health")).json()
        burst_n = max(1, round(cfg.burst_factor * health["max_queue"]))
        report: dict[str, Any] = {"config": asdict(cfg), "server": health, "phases": {}}
        stop = asyncio.Event()
        sampler = asyncio.create_task(self.sample_rss(stop))
        phases: dict[str, list[Outcome]] = {}
        for name, make in (
            ("reference", self.references),
            ("warmup", lambda: self.pool("warmup", cfg.concurrency, cfg.concurrency)),
        ):
            t0 = time.perf_counter()
            phases[name] = await make()
            report["phases"][name] = _summary(phases[name], time.perf_counter() - t0)
            _progress(name, report["phases"][name])
        rss_start = rss_bytes(self.pid) if self.pid is not None else None
        for name, make in (
            ("soak", lambda: self.pool("soak", cfg.requests, cfg.concurrency)),
            ("burst", lambda: self.burst(burst_n)),
        ):
            t0 = time.perf_counter()
            phases[name] = await make()
            report["phases"][name] = _summary(phases[name], time.perf_counter() - t0)
            _progress(name, report["phases"][name])
        rss_end = await self.idle_rss(rss_start) if rss_start is not None else None
        stop.set()
        await sampler
        failures = [asdict(o) for outcomes in phases.values() for o in outcomes if not o.ok]
        if rss_start is not None and rss_end is not None and rss_end > rss_start * (1 + cfg.rss_tolerance):
            failures.append(
                {
                    "phase": "memory",
                    "problem": f"RSS {rss_end / 2**20:.0f} MiB after the burst, "
                    f"{rss_start / 2**20:.0f} MiB before the soak (> {cfg.rss_tolerance:.0%} more)",
                }
            )
        report["rss_mib"] = (
            None
            if rss_start is None
            else {
                "after_warmup": round(rss_start / 2**20, 1),
                "peak": round(self.rss_peak / 2**20, 1),
                "after_burst_idle": round((rss_end or 0) / 2**20, 1),
            }
        )
        report["burst_requests"] = burst_n
        report["stopped_early"] = self.stopped_early
        report["failures"] = failures
        return report


def run_load(url: str, pid: int | None, cfg: LoadConfig) -> dict[str, Any]:
    """All phases against a running server; the report (``failures`` empty when every check held)."""
    return asyncio.run(Load(url, pid, cfg).run())


# --------------------------------------------------------------------------- report
def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return "unknown CPU"


def print_report(report: dict[str, Any]) -> None:
    print(
        f"server: {report['server']['model']}, max_queue {report['server']['max_queue']}, "
        f"max_batch {report['server']['max_batch']}, timeout {report['server']['timeout_s']} s"
    )
    for name, s in report["phases"].items():
        lat200 = s["latency_200_ms"] or {"p50": "-", "p99": "-"}
        print(
            f"{name:9s} {s['requests']:5d} requests in {s['seconds']:7.2f} s  {s['throughput_rps']} req/s  "
            f"200s {s['answered_200_per_s']}/s  latency p50 {s['latency_ms']['p50']} ms p99 {s['latency_ms']['p99']} ms "
            f"(200s: p50 {lat200['p50']} p99 {lat200['p99']})"
        )
        print(f"          by status {s['by_status']}")
    if report["rss_mib"]:
        print(
            f"RSS MiB: after warm-up {report['rss_mib']['after_warmup']}, peak {report['rss_mib']['peak']}, "
            f"after the burst (idle) {report['rss_mib']['after_burst_idle']}"
        )
    if report["stopped_early"]:
        print(f"stopped early (--max-seconds): {', '.join(report['stopped_early'])}")
    failures = report["failures"]
    print(f"checks: {'all held' if not failures else f'{len(failures)} FAILED'}")
    for f in failures[:20]:
        print(f"  {f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", help="a running server (default: start one on a free loopback port)")
    p.add_argument("--pid", type=int, help="with --url: the server's process id, to check its memory")
    p.add_argument("--weights", type=Path, help="weights to serve (default: the tests' tiny model)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--bad-fraction", type=float, default=0.1)
    p.add_argument("--burst-factor", type=float, default=4.0, help="burst size in multiples of max_queue (default 4)")
    p.add_argument("--max-queue", type=int, default=64, help="of the server started here (default 64)")
    p.add_argument("--max-batch", type=int, default=8, help="of the server started here (default 8)")
    p.add_argument("--timeout", type=float, default=30.0, help="of the server started here (default 30 s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server started here (default 1)")
    p.add_argument("--max-seconds", type=float, default=300.0, help="stop sending after this (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the report here")
    p.add_argument("--server-log", type=Path, help="keep the log of the server started here in this file")
    args = p.parse_args(argv)
    cfg = LoadConfig(
        requests=args.requests,
        concurrency=args.concurrency,
        bad_fraction=args.bad_fraction,
        burst_factor=args.burst_factor,
        seed=args.seed,
        max_seconds=args.max_seconds,
        client_timeout=args.timeout + 60,
    )
    load_before = os.getloadavg()
    proc = None
    with tempfile.TemporaryDirectory(prefix="nasfpn-load-") as tmp:
        if args.url:
            url, pid = args.url.rstrip("/"), args.pid
            cfg.max_upload_mb = float(httpx.get(f"{url}/health", timeout=10).json()["max_upload_mb"])
        else:
            weights = args.weights or tiny_weights(Path(tmp) / "tiny.safetensors")
            port = free_port()
            extra = [
                "--max-queue",
                str(args.max_queue),
                "--max-batch",
                str(args.max_batch),
                "--timeout",
                str(args.timeout),
                "--max-upload-mb",
                str(cfg.max_upload_mb),
            ]
            log = args.server_log or Path(tmp) / "server.log"
            proc = start_server(weights, port, log, extra, args.threads)
            url, pid = f"http://127.0.0.1:{port}", proc.pid
        try:
            report = run_load(url, pid, cfg)
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                report_exit = proc.wait(timeout=120)
                print(f"server stopped by SIGTERM, exit status {report_exit}")
    report["machine"] = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }
    print(
        f"machine: {report['machine']['cpu']}, {os.cpu_count()} cores, load average "
        f"{load_before[0]:.2f} -> {report['machine']['load_after'][0]:.2f} (shared machine: other jobs may run)"
    )
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
