"""The settings of a search (``SearchSpec``, saved as ``search.json``) and the evaluators they name.

An evaluator is described by a plain dict, ``{"kind": "proxy", ...ProxyTask fields}`` or
``{"kind": "fake", ...FakeEvaluator fields}``: ``evaluator_spec`` writes it, ``build_evaluator``
reads it back, so that ``--resume`` rebuilds the same evaluator from ``search.json`` alone.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nasfpn.search.asha import Rungs
from nasfpn.search.controllers import Controller, build_controller
from nasfpn.search.cost import CostAware, CostModel
from nasfpn.search.proxy import FakeEvaluator, ProxySettings, ProxyTask
from nasfpn.search.space import SearchSpace

SPEC_NAME = "search.json"


@dataclass(frozen=True)
class SearchSpec:
    """Everything that defines a search, saved as ``search.json`` so that ``--resume`` rebuilds
    the same controller and evaluator."""

    controller: str = "ppo"
    trials: int = 40
    seed: int = 0
    num_cells: int = 7
    gp: str = "mmdet"
    """Global-pooling op(s) of the space: ``mmdet``, ``tf`` or ``both``."""
    controller_options: dict = field(default_factory=dict)
    evaluator: dict = field(default_factory=lambda: {"kind": "fake"})
    """``{"kind": "proxy", ...ProxyTask fields}`` or ``{"kind": "fake", ...FakeEvaluator fields}``."""
    baselines: bool = True
    """Also evaluate the published NAS-FPN and the FPN genotypes (not shown to the controller)."""
    reuse: bool = True
    """A repeated network reuses the reward of its first finished trial instead of training again."""
    full_preset: str = "retinanet_r50_nasfpn_crop640_50e"
    """The full-size model ``best_config.yaml`` builds on the best genotype."""
    scheduler: str = "none"
    """``"none"``: every trial gets the evaluator's whole budget; ``"asha"``: asynchronous
    successive halving over rungs of ``min_steps * eta**k`` training steps up to ``max_steps``."""
    min_steps: int = 0
    max_steps: int = 0
    eta: int = 3
    cost: dict = field(default_factory=dict)
    """``CostModel`` fields (``cost.py``): FLOPs / latency constraints and the MnasNet-style
    reward; empty: rewards are the held-out AP alone."""
    final: dict = field(default_factory=dict)
    """After the search: ``{"val_ann", "val_images", "top_k", "baselines"}``, the best ``top_k``
    pyramids (and the baselines) trained once more at the top budget and evaluated on the
    user's validation set; empty: none."""

    def __post_init__(self) -> None:
        if self.scheduler not in ("none", "asha"):
            raise ValueError(f"scheduler must be 'none' or 'asha', got {self.scheduler!r}")
        if self.scheduler == "asha":
            self.rungs()  # checks the budgets

    def rungs(self) -> Rungs:
        """The rung budgets of an ``asha`` search."""
        return Rungs(self.min_steps, self.max_steps, self.eta)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.__dict__))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchSpec:
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> SearchSpec:
        """The spec saved in ``path`` (a ``search.json``)."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def space(self) -> SearchSpace:
        return SearchSpace.create(self.num_cells, self.gp)

    def build_controller(self) -> Controller:
        return build_controller(self.controller, self.space(), self.seed, **self.controller_options)

    def build_evaluator(self) -> Callable[..., dict]:
        """The evaluator, behind its cost model when the spec has one."""
        evaluator = build_evaluator(self.evaluator)
        if self.cost:
            return CostAware(evaluator, CostModel(**self.cost), self.full_preset)
        return evaluator


def build_evaluator(description: dict[str, Any]) -> Callable[..., dict]:
    """The evaluator a ``SearchSpec.evaluator`` entry describes (the inverse of ``evaluator_spec``)."""
    options = dict(description)
    kind = options.pop("kind")
    if kind == "fake":
        return FakeEvaluator(**options)
    if kind == "proxy":
        settings = ProxySettings(**options.pop("settings", {}))
        # JSON has no tuples: the class names and category ids come back as lists.
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
        return ProxyTask(**fields, settings=settings)
    raise ValueError(f"unknown evaluator kind {kind!r}; use 'proxy' or 'fake'")


def evaluator_spec(evaluator: Any) -> dict[str, Any]:
    """The ``SearchSpec.evaluator`` entry of a ``ProxyTask`` or ``FakeEvaluator``."""
    if isinstance(evaluator, ProxyTask):
        return {"kind": "proxy", **json.loads(json.dumps(dataclasses.asdict(evaluator)))}
    if isinstance(evaluator, FakeEvaluator):
        data = dataclasses.asdict(evaluator)
        data.pop("creator_pid")  # not a setting: whichever process builds the evaluator is its creator
        return {"kind": "fake", **data}
    raise TypeError(f"cannot describe evaluator {type(evaluator).__name__}")
