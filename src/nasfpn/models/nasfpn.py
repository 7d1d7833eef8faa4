"""NAS-FPN: a feature pyramid built from a genotype of merging cells, stacked N times.

A genotype is data. Nodes 0..4 are the pyramid inputs P3..P7; every cell appends one node:

    Cell(op, inputs=(a, b), level, out_conv)

takes nodes ``a`` and ``b``, resizes both to the size of level ``level`` (nearest upsampling,
max-pool downsampling), merges them with ``op`` and, if ``out_conv``, applies
ReLU -> 3x3 conv (with bias) -> BN. ``outputs`` names the nodes that become P3..P7 of the
stack, which feed the next stack. NAS-FPNLite (``separable=True``) is the same graph with
depthwise-separable 3x3 out convs. Ops:

- ``sum``:   x1 + x2
- ``gp``:    x2 + sigmoid(avgpool(x2)) * x1          (MMDetection / mmcv GlobalPoolingCell)
- ``gp_tf``: coarse + fine * sigmoid(maxpool(coarse)) (the authors' TensorFlow form; "coarse"
             is the input of the higher level, the second one on a tie)

Cells are named ``{op}_{level(a)}{level(b)}_{level}`` (``gp_64_4``), so the discovered
architecture reproduces MMDetection's state-dict keys and any other genotype needs no code.

Text form, used by configs and the command line (node indices; ``noconv`` drops the out conv):

    gp(3,1)->4; sum(5,1)->4; sum(6,0)->3; sum(7,6)->4; gp(8,7)->5 noconv; sum(2,9)->5;
    gp(10,6)->7 noconv; sum(4,11)->7; gp(12,10)->6; out 7,8,10,13,12
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nasfpn.models.layers import ConvBN, caffe2_xavier_, conv2d

LEVELS = (3, 4, 5, 6, 7)
OPS = ("sum", "gp", "gp_tf")


@dataclass(frozen=True)
class Cell:
    op: str
    inputs: tuple[int, int]
    level: int
    out_conv: bool = True

    def __str__(self) -> str:
        a, b = self.inputs
        return f"{self.op}({a},{b})->{self.level}" + ("" if self.out_conv else " noconv")


@dataclass(frozen=True)
class Genotype:
    cells: tuple[Cell, ...]
    outputs: tuple[int, int, int, int, int]
    """Node index of the stack's P3, P4, P5, P6, P7."""

    def node_level(self, index: int) -> int:
        return LEVELS[index] if index < len(LEVELS) else self.cells[index - len(LEVELS)].level

    def validate(self) -> Genotype:
        """Raise ``ValueError`` with the reason if this genotype cannot be built."""
        if not self.cells:
            raise ValueError("genotype has no cells")
        for i, cell in enumerate(self.cells):
            node = len(LEVELS) + i
            where = f"cell {i} ({cell})"
            if cell.op not in OPS:
                raise ValueError(f"{where}: unknown op {cell.op!r}; choose from {OPS}")
            if cell.level not in LEVELS:
                raise ValueError(f"{where}: output level {cell.level} is not one of {LEVELS}")
            if len(cell.inputs) != 2:
                raise ValueError(f"{where}: needs exactly 2 inputs")
            a, b = cell.inputs
            if a == b:
                raise ValueError(f"{where}: the two inputs must be different nodes")
            for x in (a, b):
                if not 0 <= x < node:
                    raise ValueError(f"{where}: input node {x} does not exist yet (valid: 0..{node - 1})")
        n_nodes = len(LEVELS) + len(self.cells)
        if len(self.outputs) != 5:
            raise ValueError(f"genotype needs 5 outputs (P3..P7), got {len(self.outputs)}")
        for level, node in zip(LEVELS, self.outputs):
            if not len(LEVELS) <= node < n_nodes:
                raise ValueError(f"output P{level}: node {node} is not a cell (cells are nodes 5..{n_nodes - 1})")
            if self.node_level(node) != level:
                raise ValueError(f"output P{level}: node {node} is at level {self.node_level(node)}")
        if len(set(self.outputs)) != 5:
            raise ValueError(f"outputs must be 5 different nodes, got {self.outputs}")
        return self

    def cell_names(self) -> list[str]:
        names: list[str] = []
        for cell in self.cells:
            a, b = cell.inputs
            base = f"{cell.op}_{self.node_level(a)}{self.node_level(b)}_{cell.level}"
            name, k = base, 1
            while name in names:
                k += 1
                name = f"{base}_{k}"
            names.append(name)
        return names

    # ------------------------------------------------------------------ serialisation
    def to_string(self) -> str:
        return "; ".join([str(c) for c in self.cells] + ["out " + ",".join(map(str, self.outputs))])

    @classmethod
    def from_string(cls, text: str) -> Genotype:
        cells: list[Cell] = []
        outputs: tuple[int, ...] | None = None
        for part in (p.strip() for p in text.split(";")):
            if not part:
                continue
            m = re.fullmatch(r"out\s+(\d+(?:\s*,\s*\d+)*)", part)
            if m:
                outputs = tuple(int(x) for x in m.group(1).split(","))
                continue
            m = re.fullmatch(r"(\w+)\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*->\s*(\d+)(\s+noconv)?", part)
            if not m:
                raise ValueError(
                    f"cannot parse genotype cell {part!r}; expected e.g. 'sum(5,1)->4' or 'out 7,8,10,13,12'"
                )
            op, a, b, level, noconv = m.groups()
            cells.append(Cell(op, (int(a), int(b)), int(level), out_conv=noconv is None))
        if outputs is None:
            raise ValueError(f"genotype {text!r} has no 'out ...' part naming the P3..P7 nodes")
        return cls(tuple(cells), outputs).validate()  # type: ignore[arg-type]  # validate() checks the count

    def to_json(self) -> str:
        return json.dumps(
            {
                "cells": [
                    {"op": c.op, "inputs": list(c.inputs), "level": c.level, "out_conv": c.out_conv} for c in self.cells
                ],
                "outputs": list(self.outputs),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Genotype:
        data = json.loads(text)
        cells = tuple(
            Cell(c["op"], tuple(c["inputs"]), int(c["level"]), bool(c.get("out_conv", True))) for c in data["cells"]
        )
        return cls(cells, tuple(data["outputs"])).validate()


# The discovered architecture (paper Fig. 6), in MMDetection's cell order and naming.
NASFPN_GENOTYPE = Genotype.from_string(
    "gp(3,1)->4; sum(5,1)->4; sum(6,0)->3; sum(7,6)->4; gp(8,7)->5 noconv; sum(2,9)->5; "
    "gp(10,6)->7 noconv; sum(4,11)->7; gp(12,10)->6; out 7,8,10,13,12"
)

# A plain top-down FPN written as merging cells: a baseline inside the search space. Not the
# crop-640 FPN neck of ``NeckConfig(kind="fpn")``, which is its own module (models/fpn.py).
FPN_CELLS_GENOTYPE = Genotype.from_string(
    "sum(4,3)->6; sum(5,2)->5; sum(6,1)->4; sum(7,0)->3; sum(8,7)->4; sum(9,6)->5; sum(10,5)->6; "
    "sum(11,4)->7; out 8,9,10,11,12"
)

GENOTYPES = {"nasfpn": NASFPN_GENOTYPE, "fpn_cells": FPN_CELLS_GENOTYPE}
# The name configs and search logs written before "fpn_cells" used.
GENOTYPE_ALIASES = {"fpn": "fpn_cells"}


def parse_genotype(text: str) -> Genotype:
    """A named genotype, a genotype string, or genotype JSON."""
    text = GENOTYPE_ALIASES.get(text, text)
    if text in GENOTYPES:
        return GENOTYPES[text]
    if text.lstrip().startswith("{"):
        return Genotype.from_json(text)
    return Genotype.from_string(text)


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a feature map as mmcv's merging cells do.

    Smaller maps are upsampled (nearest); larger ones are zero-padded to a multiple of the
    target and max-pooled. "Smaller" is mmcv's lexicographic comparison of (H, W), kept for
    identical results on odd shapes.
    """
    h, w = x.shape[-2:]
    th, tw = size
    if (h, w) == (th, tw):
        return x
    if (h, w) < (th, tw):
        return F.interpolate(x, size=(th, tw), mode="nearest")
    if h % th or w % tw:
        pad_h = math.ceil(h / th) * th - h
        pad_w = math.ceil(w / tw) * tw - w
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    kernel = (x.shape[-2] // th, x.shape[-1] // tw)
    return F.max_pool2d(x, kernel_size=kernel, stride=kernel)


class ReLUConvBN(nn.Module):
    """ReLU -> 3x3 conv (with bias; depthwise-separable if ``separable``) -> BN: the out conv of a merging cell."""

    def __init__(self, channels: int, separable: bool = False) -> None:
        super().__init__()
        self.conv = conv2d(channels, channels, 3, bias=True, separable=separable)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(torch.relu(x)))


class MergingCell(nn.Module):
    def __init__(
        self, op: str, channels: int, out_conv: bool, coarse_first: bool = True, separable: bool = False
    ) -> None:
        super().__init__()
        self.op = op
        self.coarse_first = coarse_first  # gp_tf only: whether x1 is the coarse input
        self.out_conv = ReLUConvBN(channels, separable) if out_conv else None

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x1, x2 = resize_to(x1, size), resize_to(x2, size)
        if self.op == "sum":
            x = x1 + x2
        elif self.op == "gp":
            x = x2 + torch.sigmoid(x2.mean(dim=(2, 3), keepdim=True)) * x1
        else:  # gp_tf
            coarse, fine = (x1, x2) if self.coarse_first else (x2, x1)
            x = coarse + fine * torch.sigmoid(coarse.amax(dim=(2, 3), keepdim=True))
        return self.out_conv(x) if self.out_conv is not None else x


class PyramidStage(nn.Module):
    """One pyramid network: P3..P7 in, P3..P7 out, cells as the genotype says."""

    def __init__(self, genotype: Genotype, channels: int, separable: bool = False) -> None:
        super().__init__()
        self.genotype = genotype
        self.names = genotype.cell_names()
        cells = {}
        for name, cell in zip(self.names, genotype.cells):
            a, b = cell.inputs
            coarse_first = genotype.node_level(a) > genotype.node_level(b)
            cells[name] = MergingCell(cell.op, channels, cell.out_conv, coarse_first, separable)
        # Registered directly (not in a container) so keys read fpn_stages.0.gp_64_4.out_conv...
        for name, module in cells.items():
            self.add_module(name, module)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        sizes = [tuple(f.shape[-2:]) for f in feats]
        nodes = list(feats)
        for name, cell in zip(self.names, self.genotype.cells):
            a, b = cell.inputs
            nodes.append(getattr(self, name)(nodes[a], nodes[b], sizes[cell.level - LEVELS[0]]))
        return [nodes[i] for i in self.genotype.outputs]


class NASFPN(nn.Module):
    """Laterals (1x1 conv + BN) on C3..C5, P6/P7 by 1x1 conv + BN + 2x2 max-pool, then N stages."""

    def __init__(
        self,
        in_channels: list[int],
        channels: int = 256,
        genotype: Genotype = NASFPN_GENOTYPE,
        stacks: int = 7,
        checkpoint_stacks: bool = False,
        separable: bool = False,
    ) -> None:
        super().__init__()
        if len(in_channels) != 3:
            raise ValueError(f"NAS-FPN expects C3, C4, C5 (3 inputs), got {len(in_channels)}")
        if stacks < 1:
            raise ValueError(f"NAS-FPN needs at least one stack, got {stacks}")
        genotype.validate()
        self.out_channels = channels
        self.checkpoint_stacks = checkpoint_stacks
        self.lateral_convs = nn.ModuleList(ConvBN(c, channels, 1) for c in in_channels)
        # ceil_mode: an odd P5 (input not a multiple of 128) gives P6 = ceil(P5 / 2), the size the
        # anchors and the FPN's stride-2 convs assume; on even sizes (MMDetection's) it changes nothing.
        self.extra_downsamples = nn.ModuleList(
            nn.Sequential(ConvBN(channels, channels, 1), nn.MaxPool2d(2, 2, ceil_mode=True)) for _ in range(2)
        )
        self.fpn_stages = nn.ModuleList(PyramidStage(genotype, channels, separable) for _ in range(stacks))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                caffe2_xavier_(m)

    def forward(self, feats: list[torch.Tensor], stacks: int | None = None) -> list[torch.Tensor]:
        """P3..P7 after the first ``stacks`` stages (all by default)."""
        return self.forward_stacks(feats, stacks)[-1]

    def forward_stacks(self, feats: list[torch.Tensor], stacks: int | None = None) -> list[list[torch.Tensor]]:
        """P3..P7 after each of the first ``stacks`` stages (for deep supervision / anytime exits)."""
        p = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for down in self.extra_downsamples:
            p.append(down(p[-1]))
        outs = []
        for stage in self.fpn_stages[: stacks or len(self.fpn_stages)]:
            if self.checkpoint_stacks and self.training and torch.is_grad_enabled():
                p = checkpoint(
                    stage,
                    p,
                    use_reentrant=False,
                    context_fn=functools.partial(_checkpoint_contexts, stage),
                )
            else:
                p = stage(p)
            outs.append(p)
        return outs


def _checkpoint_contexts(
    stage: nn.Module,
) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``checkpoint``'s ``context_fn`` for ``stage``: nothing around the forward pass, BN statistics
    frozen around the recomputation."""
    return contextlib.nullcontext(), _frozen_bn_statistics(stage)


@contextlib.contextmanager
def _frozen_bn_statistics(module: nn.Module) -> Iterator[None]:
    """BN running statistics left untouched: the checkpoint recomputation of a stage must not
    fold the same batch into them a second time."""
    # (module, momentum, its num_batches_tracked buffer, a copy of it); a BN without running
    # statistics (track_running_stats=False) has none to protect.
    saved = [
        (m, m.momentum, m.num_batches_tracked, m.num_batches_tracked.clone())
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.num_batches_tracked is not None
    ]
    for m, _, _, _ in saved:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked, value in saved:
            m.momentum = momentum
            tracked.copy_(value)
