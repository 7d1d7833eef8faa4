"""Accuracy and cost together: FLOPs and measured latency of a pyramid, as a constraint or in the reward.

``CostModel`` says which model the cost is that of (by default the full-size model the search
builds ``best_config.yaml`` from, i.e. the one that will be deployed; or the proxy model, or any
preset), what to measure and what to do with it:

- hard constraints, ``max_gflops`` / ``max_latency_ms``: an architecture over either is rejected
  before it is trained (``executors.TrialRejected``; a ``"rejected"`` line in ``trials.jsonl``
  with the reason and the measured cost, shown to the controller as reward 0);
- a soft, MnasNet-style reward (Tan et al., "MnasNet: Platform-Aware Neural Architecture Search
  for Mobile", CVPR 2019, Eq. 2): ``reward = AP * (cost / target) ** w`` with
  ``w = weight`` when ``cost <= target`` and ``weight_over`` above it (MnasNet: ``-0.07`` for
  both, its "soft" constraint; ``0`` and ``-1`` its "hard" one), for each of
  ``target_gflops`` / ``target_latency_ms`` that is set.

FLOPs: ``models.summary.count_flops`` (PyTorch's FlopCounterMode on a ``1x3xSxS`` input, 2 FLOPs
per multiply-add). Latency: the median of ``latency_runs`` timed forward passes at batch 1 of
the model behind the fast inference path (``deploy.fast.optimize_for_inference``: folded BN,
channels-last, fp32), after ``latency_warmup`` untimed ones, on the device and with the torch
threads of the worker that runs the trial: the machine running the search. Trials that run at
the same time on one machine slow each other down; measure latency with one worker (or one
worker per GPU) when it matters. The cost of a trial is measured once and kept in its folder
(``cost.json``): a promoted or resumed trial does not measure again.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from nasfpn.core.config import Config
from nasfpn.core.fileio import write_json_atomic
from nasfpn.core.machine import cpu_name
from nasfpn.core.presets import get_config
from nasfpn.deploy.fast import optimize_for_inference
from nasfpn.models import build_model
from nasfpn.models.detector import RetinaNet
from nasfpn.models.nasfpn import Genotype
from nasfpn.models.summary import count_flops, count_params
from nasfpn.search.executors import TrialRejected
from nasfpn.search.proxy import ProxyTask, full_size_config

COST_NAME = "cost.json"
MNASNET_WEIGHT = -0.07
"""MnasNet's exponent for its soft latency constraint (alpha = beta = -0.07)."""


@dataclass(frozen=True)
class CostModel:
    """What a trial's cost is measured on, and how it constrains or shapes the reward."""

    model: str = "full"
    """``"full"``: the search's full-size preset with the pyramid (``best_config.yaml``);
    ``"proxy"``: the proxy model of the trial; or a preset name."""
    image_size: int = 0
    """Input side for FLOPs and latency; 0: the model's ``data.image_size``."""
    max_gflops: float = 0.0
    max_latency_ms: float = 0.0
    target_gflops: float = 0.0
    target_latency_ms: float = 0.0
    weight: float = MNASNET_WEIGHT
    weight_over: float | None = None
    """Exponent above the target (default: ``weight``)."""
    measure_latency: bool = False
    """Measure and record latency even when no latency constraint or target asks for it."""
    latency_runs: int = 10
    latency_warmup: int = 2

    def __post_init__(self) -> None:
        if self.latency_runs < 1:
            raise ValueError(f"latency_runs must be >= 1, got {self.latency_runs}")
        for name in ("max_gflops", "max_latency_ms", "target_gflops", "target_latency_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: none), got {getattr(self, name)}")

    @property
    def needs_latency(self) -> bool:
        return self.measure_latency or self.max_latency_ms > 0 or self.target_latency_ms > 0

    def violations(self, cost: dict[str, Any]) -> list[str]:
        """Why ``cost`` breaks the hard constraints (empty: it does not)."""
        out = []
        if self.max_gflops and cost["gflops"] > self.max_gflops:
            out.append(f"{cost['gflops']:.2f} GFLOPs > max {self.max_gflops:g}")
        if self.max_latency_ms and cost["latency_ms"] > self.max_latency_ms:
            out.append(f"{cost['latency_ms']:.1f} ms > max {self.max_latency_ms:g} ms")
        return out

    def reward_factor(self, cost: dict[str, Any]) -> float:
        """The product of ``(cost / target) ** w`` over the targets that are set (1 without)."""
        factor = 1.0
        for key, target in (("gflops", self.target_gflops), ("latency_ms", self.target_latency_ms)):
            if target > 0:
                ratio = cost[key] / target
                w = self.weight if ratio <= 1 or self.weight_over is None else self.weight_over
                factor *= ratio**w
        return factor


def measure_latency_ms(
    model: RetinaNet, size: int, device: str = "cpu", runs: int = 10, warmup: int = 2
) -> list[float]:
    """Milliseconds of each of ``runs`` forward passes at batch 1 through the fast inference path."""
    net = optimize_for_inference(model.to(device).eval())
    x = torch.zeros(1, 3, size, size, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + runs):
        sync()
        t0 = time.perf_counter()
        net(x)
        sync()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
    return times


def cost_config(genotype: Genotype, model: str, full_preset: str, evaluator: Any = None) -> Config:
    """The config whose model the cost is measured on (see ``CostModel.model``)."""
    if model == "proxy":
        if not isinstance(evaluator, ProxyTask):
            raise ValueError("cost model 'proxy' needs a proxy-task evaluator")
        return evaluator.config(genotype)
    cfg = full_size_config(genotype, full_preset if model == "full" else model)
    if isinstance(evaluator, ProxyTask) and evaluator.class_names:
        # The user's classes: the head's cost depends on their number.
        m = cfg.model
        cfg = replace(cfg, model=replace(m, head=replace(m.head, num_classes=len(evaluator.class_names))))
    return cfg


def measure_cost(
    genotype: Genotype, cost_model: CostModel, full_preset: str, evaluator: Any = None, device: str = "cpu"
) -> dict[str, Any]:
    """GFLOPs, parameters and (when asked) latency of ``genotype``'s cost model."""
    cfg = cost_config(genotype, cost_model.model, full_preset, evaluator)
    size = cost_model.image_size or cfg.data.image_size
    model = build_model(cfg.model, pretrained_backbone=False)
    cost: dict[str, Any] = {
        "cost_model": f"{cfg.name}@{size}",
        "gflops": round(count_flops(model, size) / 1e9, 4),
        "model_params": count_params(model),
    }
    if cost_model.needs_latency:
        times = measure_latency_ms(model, size, device, cost_model.latency_runs, cost_model.latency_warmup)
        dev = torch.device(device)
        cost.update(
            latency_ms=round(statistics.median(times), 3),
            latency_runs=len(times),
            latency_device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
            latency_threads=torch.get_num_threads(),
        )
    return cost


@dataclass(frozen=True)
class CostAware:
    """An evaluator behind a ``CostModel``: measures the cost first (kept in ``cost.json``),
    rejects an architecture over a constraint, else trains it with ``inner`` and scales the
    reward by ``CostModel.reward_factor`` (``metrics["AP"]`` stays the plain AP)."""

    inner: Any
    cost_model: CostModel
    full_preset: str = "retinanet_r50_nasfpn_crop640_50e"

    def __post_init__(self) -> None:
        if self.cost_model.model not in ("full", "proxy"):
            get_config(self.cost_model.model)  # an unknown preset name fails here, not in every trial

    def for_split(self, heldout_ann: str, heldout_images: str | None) -> CostAware:
        return replace(self, inner=self.inner.for_split(heldout_ann, heldout_images))

    def cost(self, genotype: Genotype, trial_dir: Path, device: str = "cpu") -> dict[str, Any]:
        path = Path(trial_dir) / COST_NAME
        if path.is_file():
            return json.loads(path.read_text())
        cost = measure_cost(genotype, self.cost_model, self.full_preset, self.inner, device)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cost, path, indent=None)
        return cost

    def __call__(
        self, genotype: Genotype, trial_dir: Path, device: str = "cpu", steps: int | None = None
    ) -> dict[str, Any]:
        cost = self.cost(genotype, trial_dir, device)
        reasons = self.cost_model.violations(cost)
        if reasons:
            raise TrialRejected("over the cost constraint: " + "; ".join(reasons), cost)
        out = (
            self.inner(genotype, trial_dir, device)
            if steps is None
            else self.inner(genotype, trial_dir, device, steps=steps)
        )
        factor = self.cost_model.reward_factor(cost)
        metrics = {**out.get("metrics", {}), "reward_factor": factor}
        return {
            **out,
            "reward": float(out["reward"]) * factor,
            "metrics": metrics,
            "cost": {**out.get("cost", {}), **cost},
        }
