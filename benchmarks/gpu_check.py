"""The GPU check: CUDA-only tests, inference and training speed, memory, NCCL DDP, in one run.

    bash benchmarks/gpu_check.sh [OUT_DIR]       # or: python benchmarks/gpu_check.py [OUT_DIR]
    bash benchmarks/gpu_check.sh --plan          # the sections and their time limits; runs nothing

Made for one H100/H200-class GPU and 16 CPU cores without internet; finishes within ``--budget``
seconds (default 450, under 8 minutes with start-up). Writes ``gpu_check.json`` (everything,
raw results included), ``gpu_check.md`` (the tables, targets next to the results) and
``gpu_check.log`` (every section's output) to OUT_DIR (default: ``$OUT``, else
``benchmarks/gpu_results/``). Both reports are rewritten after every section, so a run cut
short still leaves what it measured.

Each section runs in its own process (a fresh CUDA context, so peak memory and compile caches
of one measurement do not leak into the next) under its own time limit; a section that fails or
runs out of time is recorded as such, with the tail of its output, and the others still run. A
global deadline trims the last sections' limits so the whole run stays within the budget; the
sections that matter most run first, the torch.compile ones (the slowest) last.

Measurements reuse ``nasfpn bench`` (``nasfpn/bench.py``: ``warmup`` untimed iterations, then
``iters`` timed ones, CUDA synchronised at every timed boundary, images/s = batch / p50 of the
end-to-end time from uint8 host images to detections) and the torchvision helpers of
``benchmarks/bench_vs_torchvision.py``, timed the same way. Random weights, class bias shifted
so ~1000 (anchor, class) pairs per image pass the score threshold, as with trained weights.

Without CUDA the check stops at once with exit code 2 and says so. Exit codes: 0 every section
ran (targets may still be missed: see the reports), 1 a section failed or timed out, 2 no CUDA
device, 124 the run was terminated.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Only the standard library at import time: ``--plan`` and the no-CUDA failure must be fast, and
# pytest loads this module as a plugin (``-p gpu_check``) for the CUDA test selection.

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
DEFAULT_OUT = BENCHMARKS / "gpu_results"
NO_CUDA_MESSAGE = "gpu_check: no CUDA device (torch.cuda.is_available() is False); this check needs a GPU"
EXIT_FAILED, EXIT_NO_CUDA, EXIT_TERMINATED = 1, 2, 124

FPN = "retinanet_r50_fpn_crop640_50e"
NASFPN = "retinanet_r50_nasfpn_crop640_50e"
SHORT = {FPN: "R50-FPN", NASFPN: "R50-NAS-FPN", "torchvision": "torchvision R50-FPN"}
SIZE = 640
DEFAULT_BUDGET_S = 450
RESERVE_S = 5  # kept back from the global deadline for writing the reports
MIN_SECTION_S = 20  # a section is not started with less time than this left

# Iterations per batch size: batch 1 is a few ms per call, so more iterations steady the median;
# batch 32 is 0.1-0.5 s per call.
ITERS = {1: (10, 50), 32: (3, 10)}  # batch -> (warmup, iters)
COMPILED_ITERS = {1: (5, 50), 32: (3, 10)}  # the first warm-up call compiles
TRAIN_ITERS = (3, 10)

TARGET_B1, TARGET_B32, TARGET_VS_TV = 200.0, 1000.0, 2.0
TARGET_TRAIN_BYTES = 8e9  # "8 GB" read strictly: 8 * 10^9 bytes = 7629 MiB
MIB = 2**20

INFER_KEYS = (
    "images_per_s",
    "p50_ms",
    "p90_ms",
    "net_ms",
    "post_ms",
    "peak_mb",
    "first_call_s",
    "detections_per_image",
)
TRAIN_KEYS = ("images_per_s", "p50_ms", "p90_ms", "peak_mb", "first_call_s", "fused_sgd", "loss")
RESULT_MARK = "GPU_CHECK_RESULT "


# --------------------------------------------------------------------------- the plan


@dataclass
class Section:
    """One measurement or test run: a command in its own process under its own time limit."""

    name: str
    kind: str  # env | infer | torchvision | train | tests | ddp
    title: str
    timeout_s: int
    params: dict[str, Any] = field(default_factory=dict)


def _py() -> list[str]:
    return [sys.executable]


def bench_argv(
    model: str,
    mode: str,
    batch: int,
    precision: str,
    warmup: int,
    iters: int,
    compile: bool = False,
    device: str = "cuda",
    size: int = SIZE,
) -> list[str]:
    """The ``nasfpn bench`` arguments (after ``python -m nasfpn``) of one measurement."""
    argv = [
        "bench",
        model,
        "--mode",
        mode,
        "--device",
        device,
        "--batch",
        str(batch),
        "--size",
        str(size),
        "--precision",
        precision,
        "--warmup",
        str(warmup),
        "--iters",
        str(iters),
        "--json",
    ]
    return argv + (["--compile"] if compile else [])


def _infer(model: str, batch: int, precision: str, compile: bool = False, timeout_s: int = 60) -> Section:
    warmup, iters = (COMPILED_ITERS if compile else ITERS)[batch]
    tag = f"{'compiled' if compile else 'eager'}_{precision}_b{batch}"
    short = "nasfpn" if model == NASFPN else "fpn"
    title = f"{SHORT[model]} inference, {precision}, batch {batch}, {'torch.compile' if compile else 'eager'}"
    return Section(
        f"infer_{short}_{tag}",
        "infer",
        title,
        timeout_s,
        {
            "model": model,
            "batch": batch,
            "precision": precision,
            "compile": compile,
            "argv": bench_argv(model, "infer", batch, precision, warmup, iters, compile),
        },
    )


def _train(batch: int, timeout_s: int) -> Section:
    warmup, iters = TRAIN_ITERS
    return Section(
        f"train_nasfpn_bf16_b{batch}",
        "train",
        f"R50-NAS-FPN training step, bf16 AMP, batch {batch}",
        timeout_s,
        {
            "model": NASFPN,
            "batch": batch,
            "precision": "bf16",
            "argv": bench_argv(NASFPN, "train", batch, "bf16", warmup, iters),
        },
    )


def plan() -> list[Section]:
    """The sections in run order: the ones the targets need first, torch.compile last."""
    return [
        Section("env", "env", "environment: GPU, driver, torch / CUDA versions, CPU", 45),
        Section(
            "torchvision",
            "torchvision",
            "torchvision RetinaNet-R50-FPN, eager fp32, batch 1 and 32",
            120,
            {"batches": [1, 32]},
        ),
        _infer(NASFPN, 1, "bf16"),
        _infer(NASFPN, 32, "bf16", timeout_s=90),
        _train(8, 90),
        _train(16, 120),
        _infer(NASFPN, 1, "fp32"),
        _infer(NASFPN, 32, "fp32", timeout_s=90),
        _infer(FPN, 1, "bf16"),
        _infer(FPN, 32, "bf16", timeout_s=90),
        _infer(FPN, 1, "fp32"),
        _infer(FPN, 32, "fp32", timeout_s=90),
        Section("cuda_tests", "tests", "CUDA-only pytest tests (-m 'not slow')", 150),
        Section("ddp_nccl", "ddp", "2-process NCCL DDP training steps (only with >= 2 GPUs)", 120),
        _infer(NASFPN, 1, "bf16", compile=True, timeout_s=200),
        _infer(NASFPN, 32, "bf16", compile=True, timeout_s=200),
    ]


def section_command(s: Section, workdir: Path) -> list[str]:
    """The command line of section ``s`` (``workdir``: where it may write its own files)."""
    me = str(Path(__file__).resolve())
    if s.kind in ("infer", "train"):
        return [*_py(), "-m", "nasfpn", *s.params["argv"]]
    if s.kind == "env":
        return [*_py(), me, "--worker", "env"]
    if s.kind == "torchvision":
        return [*_py(), me, "--worker", "torchvision", "--batches", *map(str, s.params["batches"])]
    if s.kind == "tests":
        files = [str(p.relative_to(ROOT)) for p in cuda_test_files()] or ["tests"]
        return [
            *_py(),
            "-m",
            "pytest",
            "-q",
            "-rA",
            "-p",
            "gpu_check",
            "-p",
            "no:cacheprovider",
            "-m",
            "not slow",
            "--junitxml",
            str(workdir / "cuda_tests.xml"),
            *files,
        ]
    if s.kind == "ddp":
        return [
            *_py(),
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            me,
            "--worker",
            "ddp",
            "--result",
            str(workdir / "ddp.json"),
        ]
    raise ValueError(f"unknown section kind {s.kind!r}")


def print_plan(budget_s: float) -> None:
    """The sections, their time limits and commands; runs nothing."""
    sections = plan()
    print(
        f"gpu_check plan: {len(sections)} sections, global budget {budget_s:.0f} s "
        f"(the last sections' limits are trimmed to it; sum of the limits {sum(s.timeout_s for s in sections)} s)"
    )
    workdir = Path("<tmp>")
    for i, s in enumerate(sections, 1):
        print(f"{i:2d}. {s.name:<28} {s.timeout_s:4d} s  {s.title}")
        print(f"      $ {shlex.join(section_command(s, workdir))}")
    print(
        "compile: only R50-NAS-FPN bf16 at batch 1 and 32 (each compile takes about a minute); "
        "DDP: skipped unless >= 2 GPUs"
    )


# --------------------------------------------------------------------------- CUDA test selection


_CUDA_TEST_PATTERN = re.compile(r"cuda\.is_available|mark\.cuda\b")
_OWN_TEST = "test_gpu_check.py"  # tests this script on CPU; it names CUDA but needs none


def cuda_test_files() -> list[Path]:
    """The test files that may hold CUDA-only tests (they mention ``torch.cuda.is_available``);
    the pytest hook below then keeps the CUDA tests of them."""
    return sorted(
        p
        for p in (ROOT / "tests").glob("test_*.py")
        if p.name != _OWN_TEST and _CUDA_TEST_PATTERN.search(p.read_text())
    )


def _needs_cuda(item: Any) -> bool:
    if re.search(r"\[[^\]]*cuda[^\]]*\]", item.name.lower()):  # parametrised on a CUDA device
        return True
    for mark in item.iter_markers():
        if mark.name == "cuda":
            return True
        if mark.name == "skipif":
            text = " ".join(map(str, mark.args)) + " " + str(mark.kwargs.get("reason", ""))
            if "cuda" in text.lower():
                return True
    return False


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """pytest hook (``-p gpu_check`` with ``GPU_CHECK_SELECT_CUDA=1``): keep only CUDA tests, those
    with a skip marker that names CUDA, a ``cuda`` marker or a CUDA parameter, so that CUDA tests
    added later are picked up too."""
    if os.environ.get("GPU_CHECK_SELECT_CUDA") != "1":
        return
    keep = [it for it in items if _needs_cuda(it)]
    drop = [it for it in items if not _needs_cuda(it)]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts and per-test outcomes of a pytest ``--junitxml`` file."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "errors", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or "")[:300]
                break
        counts[outcome] += 1
        tests.append(
            {
                "id": f"{case.get('classname')}::{case.get('name')}",
                "outcome": outcome,
                "seconds": float(case.get("time") or 0),
                "message": message,
            }
        )
    return {**counts, "total": sum(counts.values()), "tests": tests}


# --------------------------------------------------------------------------- workers (own processes)


def _emit(result: dict[str, Any]) -> None:
    print(RESULT_MARK + json.dumps(result), flush=True)


def worker_env() -> None:
    """Versions and hardware; a small bf16 matmul proves the GPU computes."""
    import platform

    import torch

    from nasfpn.apps.bench import environment

    info: dict[str, Any] = {
        "cuda_available": torch.cuda.is_available(),
        "device_count": torch.cuda.device_count(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
    }
    info.update(environment("cuda"))
    info["gpus"] = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        info["gpus"].append(
            {
                "name": p.name,
                "capability": f"{p.major}.{p.minor}",
                "memory_mib": p.total_memory // MIB,
                "sms": p.multi_processor_count,
            }
        )
    try:
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as e:  # no NCCL in this build: DDP would fail, say so
        info["nccl"] = f"unavailable ({e})"
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
        )
        info["nvidia_smi"] = smi.stdout.strip().splitlines()
        info["driver"] = info["nvidia_smi"][0].split(",")[1].strip() if info["nvidia_smi"] else None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        try:
            info["driver"] = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
        except OSError:
            info["driver"] = None
    a = torch.ones(1024, 1024, device="cuda", dtype=torch.bfloat16)
    info["matmul_ok"] = bool((a @ a).float().mean().item() == 1024.0)
    _emit(info)


def worker_torchvision(batches: list[int], device: str = "cuda", size: int = SIZE) -> None:
    """torchvision's RetinaNet-R50-FPN, eager fp32 as a user gets it, timed like ``bench_infer``."""
    import torch

    sys.path.insert(0, str(BENCHMARKS))
    from bench_vs_torchvision import calibrate_torchvision, torchvision_model, torchvision_step
    from nasfpn.apps.bench import PeakMemory, environment, latency_stats, synthetic_images

    dev = torch.device(device)
    model = torchvision_model(size, dev)
    rows = []
    for batch in batches:
        warmup, iters = ITERS.get(batch, (3, 10))
        arrays = synthetic_images(batch, size, size)
        # torchvision takes float (3, H, W) images in [0, 1]; they are on the device before timing.
        images = [torch.from_numpy(a).permute(2, 0, 1).float().div(255).to(dev) for a in arrays]
        calibrate_torchvision(model, images, model.score_thresh, 1000)
        run = torchvision_step(model, images, dev)
        t0 = time.perf_counter()
        run()
        first_s = time.perf_counter() - t0
        for _ in range(max(warmup - 1, 0)):
            run()
        parts: dict[str, list[float]] = {"pre": [], "net": [], "post": [], "total": []}
        dets = 0
        for _ in range(iters):
            t = run()
            for k in ("pre", "net", "post"):
                parts[k].append(t[k])
            parts["total"].append(t["pre"] + t["net"] + t["post"])
            dets = t["detections"]
        with PeakMemory(dev) as mem:
            run()
        med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in parts.items() if k != "total"}
        rows.append(
            {
                "model": "torchvision",
                "batch": batch,
                "size": size,
                "precision": "fp32",
                "compile": False,
                "warmup": warmup,
                "iters": iters,
                **latency_stats(parts["total"], batch),
                "pre_ms": med["pre"],
                "net_ms": med["net"],
                "post_ms": med["post"],
                "detections_per_image": dets / batch,
                "first_call_s": first_s,
                "peak_mb": mem.peak_mb,
            }
        )
    _emit({"rows": rows, "env": environment(dev)})


def worker_ddp(result: str, device: str = "cuda", steps: int = 5) -> None:
    """Under torchrun: DDP + SyncBN training steps of ``nasfpn_tiny`` (NCCL on CUDA), then check
    that every rank holds the same weights. Rank 0 writes ``result``."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from nasfpn.apps.bench import percentile, synthetic_targets
    from nasfpn.core.presets import get_config
    from nasfpn.engine import distributed as D
    from nasfpn.engine.optim import make_sgd
    from nasfpn.engine.trainer import TrainStep
    from nasfpn.models import build_model

    info = D.init_distributed(device, timeout_minutes=2)
    dev = info.device
    cfg = get_config("nasfpn_tiny")
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained_backbone=False).to(dev).train()
    group = dist.new_group() if dev.type != "cuda" else None  # CPUSyncBatchNorm wants its own group
    model = D.convert_sync_batchnorm(model, dev, group)
    step = nn.parallel.DistributedDataParallel(
        TrainStep(model, "bf16"), device_ids=[dev.index] if dev.type == "cuda" else None
    )
    optimizer = make_sgd([p for p in step.parameters() if p.requires_grad], 0.01, 0.9, 1e-4, dev)
    size = cfg.data.image_size
    g = torch.Generator().manual_seed(100 + info.rank)  # each rank its own images
    images = torch.randn(4, 3, size, size, generator=g).to(dev)
    targets = synthetic_targets(4, size, num_classes=model.num_classes, device=dev, seed=info.rank)
    times, loss = [], float("nan")
    for _ in range(steps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        a = time.perf_counter()
        out = step(images, targets)["loss"]
        out.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - a)
        loss = float(out.detach())
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if info.is_main:
        Path(result).write_text(
            json.dumps(
                {
                    "world_size": info.world_size,
                    "backend": str(dist.get_backend()),
                    "steps": steps,
                    "loss": loss,
                    "step_ms_p50": percentile(times[1:] or times, 50) * 1e3,
                    "max_param_diff": float(diff),
                    "ok": bool(float(diff) <= 1e-6 and loss == loss),
                }
            )
        )
    D.cleanup(info)


# --------------------------------------------------------------------------- running sections


class Terminated(Exception):
    """SIGTERM / SIGINT (the shell's overall ``timeout``): record what ran, then stop."""


def _on_signal(signum: int, frame: Any) -> None:
    raise Terminated(signal.Signals(signum).name)


def _kill_group(proc: subprocess.Popen) -> None:
    # Each section runs in its own session: torch.compile's workers and torchrun's ranks go too.
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output on stderr)"


def _tail(text: str, chars: int = 4000) -> str:
    return text[-chars:]


def parse_bench_json(stdout: str) -> dict[str, Any]:
    """The result of ``nasfpn bench --json`` (an indented JSON object, last on stdout)."""
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        starts = [m.start() for m in re.finditer(r"^\{$", stdout, flags=re.M)]
        if not starts:
            raise ValueError("no JSON object on stdout") from None
        return json.loads(stdout[starts[-1] :])


def parse_marked(stdout: str) -> dict[str, Any]:
    """The last ``GPU_CHECK_RESULT {...}`` line of a worker's stdout."""
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_MARK)]
    if not lines:
        raise ValueError("the worker printed no result")
    return json.loads(lines[-1][len(RESULT_MARK) :])


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT / "src"), str(BENCHMARKS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, "GPU_CHECK_SELECT_CUDA": "1", "PYTHONUNBUFFERED": "1"}


class Runner:
    """Runs the sections, keeps the record and rewrites the reports after each section."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out = out
        self.budget_s = budget_s
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check-"))
        self.log = out / "gpu_check.log"
        self.record: dict[str, Any] = {
            "schema": 1,
            "status": "running",
            "started": _now(),
            "budget_s": budget_s,
            "size": SIZE,
            "git": _git(),
            "host": _host(),
            "environment": {},
            "sections": [],
            "iterations": {
                "infer": {str(b): {"warmup": w, "iters": n} for b, (w, n) in ITERS.items()},
                "infer_compiled": {str(b): {"warmup": w, "iters": n} for b, (w, n) in COMPILED_ITERS.items()},
                "train": {"warmup": TRAIN_ITERS[0], "iters": TRAIN_ITERS[1]},
            },
        }
        self.log.write_text(f"gpu_check started {self.record['started']}\n")

    def run(self, sections: list[Section], gpu_count: int) -> None:
        """Run ``sections`` in order, each under its limit trimmed to the global deadline."""
        for s in sections:
            if s.kind == "ddp" and gpu_count < 2:
                self._add(s, "skipped", 0.0, reason=f"needs >= 2 GPUs, found {gpu_count}")
                continue
            left = self.deadline - time.monotonic() - RESERVE_S
            if left < MIN_SECTION_S:
                self._add(s, "skipped", 0.0, reason=f"global budget of {self.budget_s:.0f} s used up")
                continue
            self._run_one(s, int(min(s.timeout_s, left)))  # the last sections may get less

    def _run_one(self, s: Section, limit: int) -> None:
        work = self.tmp / s.name
        work.mkdir(parents=True, exist_ok=True)
        cmd = section_command(s, work)
        out_path, err_path = work / "stdout.txt", work / "stderr.txt"
        print(f"[gpu_check] {s.name} (limit {limit} s): {s.title}", flush=True)
        a = time.monotonic()
        status, rc, reason = "ok", None, ""
        with open(out_path, "w") as fo, open(err_path, "w") as fe:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fo, stderr=fe, env=_env(), start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                status, reason = "timeout", f"ran past its limit of {limit} s"
            except Terminated as e:
                _kill_group(proc)
                self._add(
                    s,
                    "interrupted",
                    time.monotonic() - a,
                    cmd=cmd,
                    reason=f"gpu_check got {e}",
                    tail=self._output(s, out_path, err_path),
                    limit=limit,
                )
                raise
        seconds = time.monotonic() - a
        stdout = out_path.read_text(errors="replace")
        tail = self._output(s, out_path, err_path)
        result: Any = None
        if status == "ok" and rc != 0 and s.kind != "tests":  # pytest exits 1 on a failed test: parse it
            status, reason = "failed", f"exit code {rc}: {_last_line(err_path)}"
        if status == "ok":
            try:
                result = self._parse(s, stdout, work)
            except (ValueError, OSError, ET.ParseError, KeyError) as e:
                status, reason = "failed", f"exit code {rc}; {type(e).__name__}: {e}"
            if status == "ok" and s.kind == "tests" and result is not None:
                if result["failed"] or result["errors"] or rc not in (0, None):
                    status, reason = "failed", f"exit code {rc}: {result['failed']} failed, {result['errors']} errors"
                elif result["total"] == 0:
                    status, reason = "failed", "no CUDA test was selected"
            if status == "ok" and s.kind == "ddp" and not result.get("ok"):
                status, reason = "failed", f"ranks differ by {result.get('max_param_diff')} or the loss is NaN"
            if status == "ok" and s.kind == "env" and not result.get("matmul_ok"):
                status, reason = "failed", "a bf16 matmul on the GPU gave a wrong result"
        self._add(
            s,
            status,
            seconds,
            cmd=cmd,
            rc=rc,
            reason=reason,
            tail="" if status == "ok" else tail,
            result=result,
            limit=limit,
        )
        print(f"[gpu_check] {s.name}: {status} in {seconds:.0f} s {reason}", flush=True)

    def _parse(self, s: Section, stdout: str, work: Path) -> Any:
        if s.kind in ("infer", "train"):
            r = parse_bench_json(stdout)
            missing = [k for k in (INFER_KEYS if s.kind == "infer" else TRAIN_KEYS) if k not in r]
            if missing:
                raise KeyError(f"nasfpn bench result lacks {missing}")
            return r
        if s.kind == "tests":
            return parse_junit(work / "cuda_tests.xml")
        if s.kind == "ddp":
            return json.loads((work / "ddp.json").read_text())
        r = parse_marked(stdout)
        if s.kind == "env":
            self.record["environment"] = r
        return r

    def _output(self, s: Section, out_path: Path, err_path: Path) -> str:
        stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
        with open(self.log, "a") as f:
            f.write(f"\n===== {s.name}: {s.title}\n----- stdout\n{stdout}\n----- stderr\n{stderr}\n")
        return _tail(stdout.rstrip() + "\n" + stderr.rstrip())

    def _add(
        self,
        s: Section,
        status: str,
        seconds: float,
        cmd: list[str] | None = None,
        rc: int | None = None,
        reason: str = "",
        tail: str = "",
        result: Any = None,
        limit: int | None = None,
    ) -> None:
        self.record["sections"].append(
            {
                "name": s.name,
                "kind": s.kind,
                "title": s.title,
                "status": status,
                "seconds": round(seconds, 1),
                "timeout_s": s.timeout_s,
                "limit_s": limit,
                "params": {k: v for k, v in s.params.items() if k != "argv"},
                "command": shlex.join(cmd) if cmd else None,
                "returncode": rc,
                "reason": reason,
                "error_tail": tail,
                "result": result,
            }
        )
        self.write()

    def finish(self, status: str) -> int:
        """Write the final reports, remove the scratch folder; returns the exit code."""
        self.record["status"] = status
        self.record["finished"] = _now()
        self.record["wall_s"] = round(time.monotonic() - self.t0, 1)
        self.write()
        shutil.rmtree(self.tmp, ignore_errors=True)  # the sections' output is in gpu_check.log
        bad = [s["name"] for s in self.record["sections"] if s["status"] in ("failed", "timeout", "interrupted")]
        if status == "interrupted":
            return EXIT_TERMINATED
        return EXIT_FAILED if bad else 0

    def write(self) -> None:
        """(Re)write gpu_check.json and gpu_check.md from the record so far."""
        summary = summarise(self.record)
        self.record.update(summary)
        _write_atomic(self.out / "gpu_check.json", json.dumps(self.record, indent=1, default=str))
        _write_atomic(self.out / "gpu_check.md", markdown(self.record))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _git() -> dict[str, Any]:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return {"commit": head.stdout.strip() or None, "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}


def _host() -> dict[str, Any]:
    """CPU and Python of this machine, known even when the env section fails."""
    import platform

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):  # no /proc/cpuinfo, or no model name in it
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# --------------------------------------------------------------------------- summary and reports


def summarise(record: dict[str, Any]) -> dict[str, Any]:
    """Inference / training rows, CUDA test counts, DDP and the targets from the sections so far."""
    sections = record["sections"]
    infer, train = [], []
    for s in sections:
        if s["kind"] == "infer":
            r = s["result"] or {}
            infer.append(
                {
                    "section": s["name"],
                    "status": s["status"],
                    "model": s["params"]["model"],
                    "batch": s["params"]["batch"],
                    "precision": s["params"]["precision"],
                    "compile": s["params"]["compile"],
                    **{k: r.get(k) for k in INFER_KEYS},
                }
            )
        elif s["kind"] == "torchvision":
            rows = (s["result"] or {}).get("rows") or [{"batch": b} for b in s["params"]["batches"]]
            for r in rows:
                infer.append(
                    {
                        "section": s["name"],
                        "status": s["status"],
                        "model": "torchvision",
                        "batch": r["batch"],
                        "precision": "fp32",
                        "compile": False,
                        **{k: r.get(k) for k in INFER_KEYS},
                    }
                )
        elif s["kind"] == "train":
            r = s["result"] or {}
            train.append(
                {
                    "section": s["name"],
                    "status": s["status"],
                    "model": s["params"]["model"],
                    "batch": s["params"]["batch"],
                    "precision": s["params"]["precision"],
                    "skipped_steps": r.get("skipped_steps"),  # non-finite steps, where bench reports them
                    **{k: r.get(k) for k in TRAIN_KEYS},
                }
            )
    tv = {r["batch"]: r["images_per_s"] for r in infer if r["model"] == "torchvision" and r["images_per_s"]}
    for r in infer:
        r["vs_torchvision"] = r["images_per_s"] / tv[r["batch"]] if r["images_per_s"] and tv.get(r["batch"]) else None
    tests = next((s for s in sections if s["kind"] == "tests"), None)
    ddp = next((s for s in sections if s["kind"] == "ddp"), None)
    return {
        "inference": infer,
        "training": train,
        "targets": targets(infer, train, tests, ddp),
        "cuda_tests": ({"status": tests["status"], **(tests["result"] or {})} if tests else None),
        "ddp": ({"status": ddp["status"], "reason": ddp["reason"], **(ddp["result"] or {})} if ddp else None),
    }


def _best(infer: list[dict[str, Any]], model: str, batch: int, precision: str) -> dict[str, Any] | None:
    rows = [
        r
        for r in infer
        if r["model"] == model and r["batch"] == batch and r["precision"] == precision and r["images_per_s"]
    ]
    return max(rows, key=lambda r: r["images_per_s"]) if rows else None


def _variant(r: dict[str, Any]) -> str:
    return "torch.compile" if r["compile"] else "eager"


def targets(
    infer: list[dict[str, Any]], train: list[dict[str, Any]], tests: dict[str, Any] | None, ddp: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """One row per target: what was measured, the target, and met / missed / not measured."""
    rows = []

    def add(check: str, value: float | None, shown: str, target: str, ok: bool | None, note: str = "") -> None:
        status = "not measured" if ok is None else ("met" if ok else "missed")
        rows.append(
            {
                "check": check,
                "value": value,
                "measured": shown if ok is not None else "-",
                "target": target,
                "status": status,
                "note": note,
            }
        )

    for batch, goal in ((1, TARGET_B1), (32, TARGET_B32)):
        r = _best(infer, NASFPN, batch, "bf16")
        add(
            f"R50-NAS-FPN inference, bf16, batch {batch}, {SIZE}x{SIZE}",
            r and r["images_per_s"],
            f"{r['images_per_s']:.0f} images/s ({_variant(r)})" if r else "",
            f">= {goal:.0f} images/s",
            None if r is None else r["images_per_s"] >= goal,
            "best of eager and torch.compile",
        )
    for model in (NASFPN, FPN):
        for batch in (1, 32):
            r = _best(infer, model, batch, "bf16")
            ratio = r and r["vs_torchvision"]
            add(
                f"{SHORT[model]} bf16 vs torchvision eager fp32, batch {batch}",
                ratio,
                f"{ratio:.2f}x ({_variant(r)})" if ratio else "",
                f">= {TARGET_VS_TV:.0f}x",
                None if not ratio else ratio >= TARGET_VS_TV,
                "same architecture as torchvision's" if model == FPN else "best of eager and torch.compile",
            )
    r = next((t for t in train if t["batch"] == 8 and t["peak_mb"] is not None), None)
    add(
        f"R50-NAS-FPN training step, bf16 AMP, batch 8, {SIZE}x{SIZE}: peak memory",
        r and r["peak_mb"],
        f"{r['peak_mb']:.0f} MiB ({r['images_per_s']:.0f} images/s)" if r else "",
        f"< 8 GB ({TARGET_TRAIN_BYTES / MIB:.0f} MiB)",
        None if r is None else r["peak_mb"] * MIB < TARGET_TRAIN_BYTES,
        "CUDA max_memory_allocated (tensors, not the allocator's reserve)",
    )
    if tests is not None:
        t = tests["result"]
        add(
            "CUDA-only tests",
            t and t["passed"],
            f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped" if t else "",
            "all pass, none skipped",
            None if t is None else (tests["status"] == "ok" and not t["skipped"]),
        )
    if ddp is not None:
        d = ddp["result"]
        add(
            "2-process NCCL DDP step",
            d and d.get("max_param_diff"),
            f"ranks agree (max diff {d['max_param_diff']:.1e}), {d['step_ms_p50']:.0f} ms/step" if d else "",
            "runs, ranks hold the same weights",
            None if d is None else bool(d.get("ok")),
            ddp["reason"] if ddp["status"] == "skipped" else "",
        )
    return rows


def _cell(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(_cell(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]


def markdown(record: dict[str, Any]) -> str:
    """The report: environment, targets, inference, training, tests, DDP, sections, choices."""
    env = {**record.get("host", {}), **(record.get("environment") or {})}
    gpus = ", ".join(f"{g['name']} ({g['memory_mib']} MiB, sm {g['capability']})" for g in env.get("gpus", [])) or "-"
    lines = [
        f"# GPU check ({record['status']})",
        "",
        f"- started {record['started']}, wall {record.get('wall_s', '-')} s of a {record['budget_s']:.0f} s budget;"
        f" commit {(record['git'].get('commit') or '-')[:12]}{' (dirty)' if record['git'].get('dirty') else ''}",
        f"- GPU: {gpus}; driver {env.get('driver', '-')}",
        f"- torch {env.get('torch', '-')}, CUDA {env.get('cuda_runtime', '-')}, cuDNN {env.get('cudnn', '-')}, "
        f"NCCL {env.get('nccl', '-')}, torchvision {env.get('torchvision', '-')}, Python {env.get('python', '-')}",
        f"- CPU: {env.get('cpu', '-')} ({env.get('cpu_count', '-')} cores, torch threads {env.get('threads', '-')})",
        "",
        "## Targets",
        "",
    ]
    lines += _table(
        ["check", "measured", "target", "status", "note"],
        [[t["check"], t["measured"], t["target"], f"**{t['status']}**", t["note"]] for t in record.get("targets", [])],
    )
    goal = {(NASFPN, 1, "bf16"): f">= {TARGET_B1:.0f}", (NASFPN, 32, "bf16"): f">= {TARGET_B32:.0f}"}
    rows = []
    for r in record.get("inference", []):
        target = goal.get((r["model"], r["batch"], r["precision"]), "")
        met = (
            ""
            if not target or not r["images_per_s"]
            else ("met" if r["images_per_s"] >= float(target[3:]) else "missed")
        )
        rows.append(
            [
                SHORT[r["model"]],
                r["batch"],
                r["precision"],
                _variant(r),
                r["status"],
                _cell(r["images_per_s"]),
                target or "-",
                met or "-",
                _cell(r["vs_torchvision"], 2),
                _cell(r["p50_ms"], 2),
                _cell(r["p90_ms"], 2),
                _cell(r["net_ms"], 2),
                _cell(r["post_ms"], 2),
                _cell(r["peak_mb"], 0),
                _cell(r["first_call_s"]),
            ]
        )
    lines += ["", f"## Inference, {SIZE}x{SIZE}, end to end (images -> detections)", ""]
    lines += _table(
        [
            "model",
            "batch",
            "precision",
            "mode",
            "status",
            "images/s",
            "target images/s",
            "met",
            "x torchvision",
            "p50 ms",
            "p90 ms",
            "network ms",
            "post ms",
            "peak MiB",
            "first call s",
        ],
        rows,
    )
    lines += ["", f"## Training step, R50-NAS-FPN, {SIZE}x{SIZE}, bf16 AMP", ""]
    lines += _table(
        [
            "batch",
            "status",
            "images/s",
            "step p50 ms",
            "p90 ms",
            "peak MiB",
            "target peak",
            "met",
            "fused SGD",
            "loss",
            "skipped steps",
            "first step s",
        ],
        [
            [
                t["batch"],
                t["status"],
                _cell(t["images_per_s"]),
                _cell(t["p50_ms"]),
                _cell(t["p90_ms"]),
                _cell(t["peak_mb"], 0),
                f"< {TARGET_TRAIN_BYTES / MIB:.0f}" if t["batch"] == 8 else "-",
                ("-" if t["peak_mb"] is None else "met" if t["peak_mb"] * MIB < TARGET_TRAIN_BYTES else "missed")
                if t["batch"] == 8
                else "-",
                _cell(t["fused_sgd"]),
                _cell(t["loss"], 3),
                _cell(t["skipped_steps"]),
                _cell(t["first_call_s"]),
            ]
            for t in record.get("training", [])
        ],
    )
    ct = record.get("cuda_tests")
    if ct:
        lines += [
            "",
            "## CUDA-only tests",
            "",
            f"{ct['status']}: {ct.get('passed', 0)} passed, {ct.get('failed', 0)} failed, "
            f"{ct.get('errors', 0)} errors, {ct.get('skipped', 0)} skipped",
            "",
        ]
        lines += [
            f"- `{t['id']}`: {t['outcome']}" + (f" ({t['message']})" if t["message"] else "")
            for t in ct.get("tests", [])
        ]
    d = record.get("ddp")
    if d:
        lines += [
            "",
            "## NCCL DDP",
            "",
            f"{d['status']}"
            + (f": {d['reason']}" if d.get("reason") else "")
            + (
                f"; {d['world_size']} ranks, {d['backend']}, {d['step_ms_p50']:.1f} ms/step, max weight difference "
                f"between ranks {d['max_param_diff']:.1e}"
                if d.get("world_size")
                else ""
            ),
        ]
    lines += ["", "## Sections", ""]
    lines += _table(
        ["section", "status", "seconds", "limit s (planned)", "reason"],
        [
            [
                s["name"],
                s["status"],
                _cell(s["seconds"]),
                f"{s.get('limit_s') or '-'} ({s['timeout_s']})",
                s["reason"] or "-",
            ]
            for s in record["sections"]
        ],
    )
    for s in record["sections"]:
        if s["error_tail"]:
            tail = "\n".join(s["error_tail"].splitlines()[-25:])
            lines += [
                "",
                f"<details><summary>{s['name']}: {s['status']} (last lines)</summary>",
                "",
                "```",
                tail,
                "```",
                "",
                "</details>",
            ]
    it = record["iterations"]
    lines += [
        "",
        "## How it was measured",
        "",
        "- `nasfpn bench --json` per configuration, each in a fresh process; images/s = batch / p50 of the "
        "end-to-end time (uint8 host images -> pre-processing on the GPU -> network -> detections), CUDA "
        "synchronised at each timed boundary; peak = `torch.cuda.max_memory_allocated` over one extra call.",
        f"- iterations (warm-up + timed): eager batch 1 {it['infer']['1']['warmup']} + {it['infer']['1']['iters']}, "
        f"batch 32 {it['infer']['32']['warmup']} + {it['infer']['32']['iters']}; compiled batch 1 "
        f"{it['infer_compiled']['1']['warmup']} + {it['infer_compiled']['1']['iters']}, batch 32 "
        f"{it['infer_compiled']['32']['warmup']} + {it['infer_compiled']['32']['iters']}; training "
        f"{it['train']['warmup']} + {it['train']['iters']} steps.",
        "- bf16: weights and activations in bf16 (`optimize_for_inference`: BN folded, channels-last); fp32: the "
        "same fast path in fp32. torch.compile only for R50-NAS-FPN bf16 at batch 1 and 32 (compiles take about "
        "a minute each; the run has one budget).",
        "- torchvision: `retinanet_resnet50_fpn(weights=None, weights_backbone=None, min_size=640, max_size=640)`,"
        " eager fp32 NCHW, as a user gets it, same run and same timing; its float images are on the GPU before "
        "timing, ours start as uint8 host arrays (the upload is in our time).",
        "- random weights; class bias shifted so ~1000 (anchor, class) pairs per image pass the score threshold.",
        "- training: forward, loss (8 random boxes per image), backward, fused SGD, NCHW (the recipe's layout); "
        "random 640x640 images.",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- entry point


def _cuda_devices() -> int | None:
    """The CUDA device count, or None without CUDA."""
    try:
        import torch
    except ImportError as e:
        print(f"gpu_check: torch cannot be imported ({e}); this check needs PyTorch with CUDA", file=sys.stderr)
        return None
    return torch.cuda.device_count() if torch.cuda.is_available() else None


def main(argv: list[str] | None = None) -> int:
    """Run the check (or a worker, or print the plan); returns the exit code."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", help="output folder (default: $OUT, else benchmarks/gpu_results/)")
    p.add_argument(
        "--plan",
        "--dry-run",
        action="store_true",
        dest="plan",
        help="print the sections and their time limits; run nothing",
    )
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole run (default 450)")
    p.add_argument("--only", nargs="+", metavar="SECTION", help="run only these sections (env always runs)")
    p.add_argument("--worker", choices=["env", "torchvision", "ddp"], help=argparse.SUPPRESS)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker == "env":
        worker_env()
        return 0
    if args.worker == "torchvision":
        worker_torchvision(args.batches, args.device)
        return 0
    if args.worker == "ddp":
        worker_ddp(args.result, args.device)
        return 0
    if args.plan:
        print_plan(args.budget)
        return 0

    sections = plan()
    if args.only:
        unknown = set(args.only) - {s.name for s in sections}
        if unknown:
            p.error(f"unknown sections {sorted(unknown)}; see --plan")
        sections = [s for s in sections if s.name == "env" or s.name in args.only]
    out = Path(args.out or os.environ.get("OUT") or DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() == DEFAULT_OUT.resolve():
        (out / ".gitignore").write_text("*\n")  # results of a machine, not sources
    gpu_count = _cuda_devices()
    if gpu_count is None:
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        _write_atomic(
            out / "gpu_check.json",
            json.dumps({"schema": 1, "status": "no_cuda", "message": NO_CUDA_MESSAGE, "started": _now()}, indent=1),
        )
        _write_atomic(out / "gpu_check.md", f"# GPU check (no_cuda)\n\n{NO_CUDA_MESSAGE}\n")
        return EXIT_NO_CUDA

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    runner = Runner(out, args.budget)
    try:
        runner.run(sections, gpu_count)
        code = runner.finish("completed")
    except Terminated:
        code = runner.finish("interrupted")
    print(f"[gpu_check] wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} (exit {code})", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
