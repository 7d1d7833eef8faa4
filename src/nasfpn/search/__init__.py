"""Architecture search for NAS-FPN pyramids (Ghiasi, Lin, Le, CVPR 2019, Sec. 3).

- ``space``: the paper's search space of merging cells (``PaperGenotype``, ``SearchSpace``) and its
  lowering to the node-form ``Genotype`` that ``models.nasfpn`` builds;
- ``controllers``: random search, regularised evolution, the RNN controller trained with PPO;
- ``proxy``: the proxy task (short training of a small RetinaNet, reward = held-out AP);
- ``spec``: ``SearchSpec``, the settings of a search (``search.json``), and the evaluators it names;
- ``executors``: where trials run: inline, in worker processes or on Ray;
- ``asha``: asynchronous successive halving (multi-fidelity rungs of training steps);
- ``cost``: FLOPs and measured latency as constraints or in an MnasNet-style reward;
- ``data``: one split of a user's COCO / YOLO / VOC dataset as a COCO json;
- ``log``: the append-only trial log, controller snapshots and resume, and what is read out of it;
- ``runner``: the asynchronous, resumable event loop (``run_search``) and ``search``;
- ``outputs``: best genotype, full-size config, summary, plots; the comparison of searches;
- ``plots``: reward over trials, unique architectures over time, cell graphs.

    from nasfpn.search import SearchSpec, evaluator_spec, search
    spec = SearchSpec(controller="evolution", trials=40, evaluator=evaluator_spec(task))
    result = search(spec, "runs/search", workers=2)
"""

from nasfpn.search.asha import Asha, Rungs
from nasfpn.search.controllers import Controller, PPOController, RandomSearch, RegularizedEvolution, build_controller
from nasfpn.search.cost import CostAware, CostModel
from nasfpn.search.proxy import FakeEvaluator, ProxySettings, ProxyTask, prepare_proxy_task, split_held_out
from nasfpn.search.runner import SearchResult, run_search, search
from nasfpn.search.space import (
    FPN_CELLS_PAPER,
    NASFPN_PAPER,
    PaperCell,
    PaperGenotype,
    SearchSpace,
    parse_paper_genotype,
)
from nasfpn.search.spec import SearchSpec, evaluator_spec

__all__ = [
    "FPN_CELLS_PAPER",
    "NASFPN_PAPER",
    "Asha",
    "Controller",
    "CostAware",
    "CostModel",
    "FakeEvaluator",
    "PPOController",
    "PaperCell",
    "PaperGenotype",
    "ProxySettings",
    "ProxyTask",
    "RandomSearch",
    "RegularizedEvolution",
    "Rungs",
    "SearchResult",
    "SearchSpace",
    "SearchSpec",
    "build_controller",
    "evaluator_spec",
    "parse_paper_genotype",
    "prepare_proxy_task",
    "run_search",
    "search",
    "split_held_out",
]
