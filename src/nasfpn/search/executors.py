"""Where trials run: in this process, in worker processes, or as Ray tasks.

Every executor has the same small interface (``Executor``): ``capacity`` trials may be in
flight, ``submit(key, genotype_text, trial_dir, steps=None)`` starts one (``steps``: a
multi-fidelity rung's training budget), ``wait()`` returns the
``(key, result)`` pairs of the trials that finished, ``close()`` ends the workers. A result is
the dict of ``evaluate_trial``: ``"ok"`` with a reward, or ``"failed"`` with an error; an
executor never raises for a trial. ``build_executor`` picks one by backend name:

- ``"process"``: ``ProcessExecutor``, long-lived worker processes on this machine, one per
  GPU when ``devices`` names GPUs, CPU workers otherwise with the cores split between them
  (``torch.set_num_threads``), so K workers do not oversubscribe the machine;
- ``"ray"``: ``RayExecutor``, Ray tasks on a cluster (``ray_address``: ``"auto"``,
  ``"ray://..."``, ``host:port``, or ``"local"`` to start a private local instance); each task
  asks Ray for ``threads`` CPUs and, with GPUs, one GPU. Trial folders are created on the
  machine that runs the trial (same path);
- ``"inline"``: ``InlineExecutor``, one at a time in this process (debugging, tests).

Worker processes start from a fork server: as with any ``multiprocessing`` code, a script that
runs a search with process workers needs the ``if __name__ == "__main__":`` guard. A worker
whose search process disappears (killed) ends itself within a second.

An evaluator is a picklable callable ``evaluator(genotype, trial_dir, device) -> dict`` with a
float ``"reward"`` and optional ``"metrics"`` and ``"cost"`` dicts (``proxy.ProxyTask``, or
``proxy.FakeEvaluator`` for tests). It receives the node-form ``Genotype`` to build.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from nasfpn.models.nasfpn import Genotype


class Executor(Protocol):
    """Runs trials, ``capacity`` at a time; results come back from ``wait`` as they finish, with
    the key they were submitted with (any hashable value; the executor does not look at it)."""

    capacity: int

    def submit(self, key: Any, genotype_text: str, trial_dir: str, steps: int | None = None) -> None:
        """Start the trial ``key`` on the node-form genotype ``genotype_text`` in ``trial_dir``
        (``steps``: the training budget of a multi-fidelity rung; ``None``: the evaluator's own)."""

    def wait(self, timeout: float | None = None) -> list[tuple[Any, dict[str, Any]]]:
        """The ``(key, result)`` of trials that finished (at least one unless none is in flight)."""

    def close(self) -> None:
        """End the workers; trials still in flight are abandoned."""


# --------------------------------------------------------------------------- one trial
class TrialRejected(Exception):
    """Raised by an evaluator for an architecture it will not train (over a cost constraint);
    ``cost`` holds what was measured."""

    def __init__(self, reason: str, cost: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cost = dict(cost or {})


def evaluate_trial(
    evaluator: Callable[..., dict],
    genotype_text: str,
    trial_dir: str,
    device: str = "cpu",
    threads: int | None = None,
    steps: int | None = None,
) -> dict[str, Any]:
    """Run ``evaluator`` on one node-form genotype (with ``steps=`` when a budget is given);
    never raises: a failure comes back as ``{"status": "failed", "error": ...}``, an
    architecture the evaluator refuses (``TrialRejected``) as ``{"status": "rejected", "reason": ...}``."""
    if threads:
        torch.set_num_threads(threads)
    started = time.time()
    try:
        Path(trial_dir).mkdir(parents=True, exist_ok=True)
        genotype = Genotype.from_string(genotype_text)
        if steps is None:
            out = evaluator(genotype, Path(trial_dir), device)
        else:
            out = evaluator(genotype, Path(trial_dir), device, steps=steps)
        reward = float(out["reward"])
        if not math.isfinite(reward):
            raise FloatingPointError(f"non-finite reward {reward}")
        result: dict[str, Any] = {
            "status": "ok",
            "reward": reward,
            "metrics": dict(out.get("metrics") or {}),
            "cost": dict(out.get("cost") or {}),
        }
    except TrialRejected as e:
        result = {"status": "rejected", "reason": e.reason, "cost": e.cost}
    except Exception as e:  # any trial failure is data, not a reason to stop the search
        if "out of memory" in str(e).lower() and torch.cuda.is_available():
            torch.cuda.empty_cache()
        tb = traceback.format_exc().strip().splitlines()
        result = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000], "traceback": "\n".join(tb[-12:])}
    finished = time.time()
    result.setdefault("cost", {})["wall_s"] = round(finished - started, 3)
    result.update(started=round(started, 3), finished=round(finished, 3), host=socket.gethostname(), pid=os.getpid())
    return result


# --------------------------------------------------------------------------- in this process
class InlineExecutor:
    """Runs each trial in this process when results are asked for."""

    def __init__(self, evaluator: Callable[..., dict], device: str = "cpu") -> None:
        self.evaluator, self.device = evaluator, device
        self.queue: list[tuple[Any, str, str, int | None]] = []
        self.capacity = 1

    def submit(self, key: Any, genotype_text: str, trial_dir: str, steps: int | None = None) -> None:
        self.queue.append((key, genotype_text, trial_dir, steps))

    def wait(self, timeout: float | None = None) -> list[tuple[Any, dict[str, Any]]]:
        if not self.queue:
            return []
        key, text, trial_dir, steps = self.queue.pop(0)
        return [(key, evaluate_trial(self.evaluator, text, trial_dir, self.device, steps=steps))]

    def close(self) -> None:
        self.queue.clear()


# --------------------------------------------------------------------------- worker processes
def _exit_with_search(search_pid: int) -> None:
    """Worker side: end this process when the search process is gone (e.g. SIGKILLed), rather
    than finish a trial nobody will read."""
    while True:
        try:
            os.kill(search_pid, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:
            pass
        time.sleep(0.5)


def _worker_main(conn, evaluator, device: str, threads: int | None, search_pid: int) -> None:
    threading.Thread(target=_exit_with_search, args=(search_pid,), daemon=True).start()
    if threads:
        torch.set_num_threads(threads)
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        key, text, trial_dir, steps = msg
        conn.send((key, evaluate_trial(evaluator, text, trial_dir, device, threads, steps)))


@dataclass
class _Worker:
    device: str
    process: Any = None
    conn: Any = None
    task: tuple[Any, str, str, int | None] | None = None


class ProcessExecutor:
    """``len(devices)`` long-lived worker processes, one trial each at a time. A worker that dies
    mid-trial fails that trial and is replaced."""

    def __init__(self, evaluator: Callable[..., dict], devices: list[str], threads: int | None = None) -> None:
        self.evaluator, self.threads = evaluator, threads
        if "forkserver" in mp.get_all_start_methods():
            # Workers fork from a clean server process that has imported torch and nasfpn once,
            # so starting or replacing a worker costs no import time.
            forkserver = mp.get_context("forkserver")
            forkserver.set_forkserver_preload([__name__])
            self.ctx: mp.context.ForkServerContext | mp.context.SpawnContext = forkserver
        else:
            self.ctx = mp.get_context("spawn")
        self.workers = [_Worker(d) for d in devices]
        self.capacity = len(devices)

    def _start(self, w: _Worker) -> None:
        parent, child = self.ctx.Pipe()
        w.process = self.ctx.Process(
            target=_worker_main,
            args=(child, self.evaluator, w.device, self.threads, os.getpid()),
            daemon=True,
            name=f"nasfpn-search-{w.device}",
        )
        w.process.start()
        child.close()
        w.conn = parent

    def submit(self, key: Any, genotype_text: str, trial_dir: str, steps: int | None = None) -> None:
        w = next(w for w in self.workers if w.task is None)
        if w.process is None or not w.process.is_alive():
            self._start(w)
        w.task = (key, genotype_text, trial_dir, steps)
        w.conn.send(w.task)

    def wait(self, timeout: float | None = None) -> list[tuple[Any, dict[str, Any]]]:
        busy = [w for w in self.workers if w.task is not None]
        if not busy:
            return []
        mp.connection.wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout)
        done = []
        for w in busy:
            result = None
            try:
                if w.conn.poll():
                    _, result = w.conn.recv()
            except (EOFError, OSError):
                result = None
            if result is None and not w.process.is_alive():
                code = w.process.exitcode
                why = " (killed: out of memory?)" if code in (-9, 137) else ""
                result = {"status": "failed", "error": f"worker process died with exit code {code}{why}", "cost": {}}
                w.conn.close()
                w.process = None
            if result is not None and w.task is not None:
                done.append((w.task[0], result))
                w.task = None
        return done

    def close(self) -> None:
        for w in self.workers:
            if w.process is not None and w.process.is_alive():
                with contextlib.suppress(OSError):  # a worker that is going away already
                    w.conn.send(None)
        for w in self.workers:
            if w.process is not None:
                w.process.join(timeout=2 if w.task is None else 0)
                if w.process.is_alive():
                    w.process.kill()
                    w.process.join()
                w.process = None


# --------------------------------------------------------------------------- Ray
def _ray_trial(
    evaluator, genotype_text: str, trial_dir: str, device: str, threads: int | None, steps: int | None = None
) -> dict:
    return evaluate_trial(evaluator, genotype_text, trial_dir, device, threads, steps)


class RayExecutor:
    """Trials as Ray tasks, ``capacity`` in flight; a task that raises or whose worker dies is a
    failed trial. Each task asks Ray for ``threads`` CPUs (default: the cluster's CPUs shared by the
    trials in flight) and ``gpus_per_trial`` GPUs (default: 1 if the cluster has GPUs)."""

    def __init__(
        self,
        evaluator: Callable[..., dict],
        workers: int,
        address: str | None = "local",
        threads: int | None = None,
        gpus_per_trial: float | None = None,
    ) -> None:
        import ray  # optional (``pip install nasfpn[search]``): only Ray searches need it

        self.ray = ray
        self.started_ray = False
        if not ray.is_initialized():
            if address in (None, "", "local"):
                ray.init(num_cpus=cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
            else:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            self.started_ray = True
        resources = ray.cluster_resources()
        if gpus_per_trial is None:
            gpus_per_trial = 1.0 if resources.get("GPU", 0) > 0 else 0.0
        self.threads = threads or max(1, int(resources.get("CPU", 1) // workers))
        self.capacity = workers
        self.device = "cuda" if gpus_per_trial > 0 else "cpu"
        self.evaluator_ref = ray.put(evaluator)
        self.remote = ray.remote(_ray_trial).options(num_cpus=self.threads, num_gpus=gpus_per_trial, max_retries=0)
        self.refs: dict[Any, Any] = {}  # Ray object ref -> trial key

    def submit(self, key: Any, genotype_text: str, trial_dir: str, steps: int | None = None) -> None:
        ref = self.remote.remote(self.evaluator_ref, genotype_text, trial_dir, self.device, self.threads, steps)
        self.refs[ref] = key

    def wait(self, timeout: float | None = None) -> list[tuple[Any, dict[str, Any]]]:
        if not self.refs:
            return []
        ready, _ = self.ray.wait(list(self.refs), num_returns=1, timeout=timeout)
        done = []
        for ref in ready:
            key = self.refs.pop(ref)
            try:
                result = self.ray.get(ref)
            except Exception as e:  # a lost worker / node is a failed trial
                result = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000], "cost": {}}
            done.append((key, result))
        return done

    def close(self) -> None:
        for ref in self.refs:
            with contextlib.suppress(Exception):  # a task that finished or was lost meanwhile
                self.ray.cancel(ref, force=True)
        self.refs.clear()
        if self.started_ray:
            self.ray.shutdown()


# --------------------------------------------------------------------------- choosing one
def default_devices(workers: int | None = None) -> list[str]:
    """One worker per GPU when there are GPUs, else ``workers`` (default 1) CPU workers."""
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return [f"cuda:{i % n}" for i in range(workers or n)]
    return ["cpu"] * (workers or 1)


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def build_executor(
    evaluator: Callable[..., dict],
    backend: str = "process",
    workers: int = 1,
    ray_address: str | None = None,
    threads: int | None = None,
    devices: list[str] | None = None,
) -> Executor:
    """An executor for ``backend`` (``process``, ``ray`` or ``inline``); CPU workers share the
    cores evenly unless ``threads`` is given."""
    if backend == "inline":
        return InlineExecutor(evaluator, (devices or ["cpu"])[0])
    if backend == "process":
        devices = devices or default_devices(workers)
        n_cpu_workers = sum(d == "cpu" for d in devices)
        threads = threads or (max(1, cpu_count() // n_cpu_workers) if n_cpu_workers else None)
        return ProcessExecutor(evaluator, devices, threads)
    if backend == "ray":
        return RayExecutor(evaluator, workers or 1, ray_address, threads)
    raise ValueError(f"unknown backend {backend!r}; use 'process', 'ray' or 'inline'")
