"""The NAS-FPN search space in the paper's form, and its lowering to the node form we build.

Paper form (Ghiasi, Lin, Le, CVPR 2019, Sec. 3.1). A pyramid network is ``N`` merging cells
over a pool that starts as the five inputs P3..P7. Cell ``k`` makes four decisions:

1. input 1: any feature of the pool,
2. input 2: any *other* feature of the pool,
3. output level: P4..P7 for the first ``N - 5`` (intermediate) cells, which never output at
   stride 8; the last five cells produce P3..P7 in an order the controller picks (a
   permutation, decided cell by cell among the levels not yet taken),
4. binary op: ``sum`` or global pooling (``gp`` in MMDetection's form, ``gp_tf`` in the
   authors' TensorFlow form; which ones a space offers is an option of ``SearchSpace``),

and appends its output to the pool. Pool indices: 0..4 are P3..P7, ``5 + k`` is cell ``k``.

Unconsumed features. When an output cell at level ``L`` is built, every pool feature at level
``L`` that no cell has consumed so far is summed into it, before its ReLU-conv-BN (as the
authors' implementation does: the check runs at the moment the output cell is built, so a
feature that a *later* cell consumes is still summed in). A feature summed in this way counts
as consumed.

Lowering to the node form of ``models/nasfpn.py``: an intermediate cell keeps its out conv (as
in the TensorFlow implementation); an output cell without unconsumed features is one node; an
output cell with unconsumed features ``u1..um`` becomes a node without out conv followed by
``sum(u1, cell)``, ``sum(u2, previous)``, ... of which only the last has the out conv, exactly
as MMDetection writes ``sum_55_5 = sum(p5, gp_43_5)``. So the published architecture lowers to
``NASFPN_GENOTYPE`` node for node (same names, same state-dict keys)::

    gp(P6,P4)->P4; sum(c0,P4)->P4; sum(c1,P3)->P3; sum(c2,c1)->P4; gp(c3,c2)->P5;
    gp(c4,c1)->P7; gp(c5,c4)->P6

Inputs are ordered: ``gp`` is not symmetric, and the controller picks input 1 and input 2 as
two decisions. ``PaperGenotype.canonical`` orders the inputs of symmetric cells, for counting
distinct networks.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

import numpy as np

from nasfpn.models.nasfpn import (
    FPN_CELLS_GENOTYPE,
    GENOTYPE_ALIASES,
    GENOTYPES,
    LEVELS,
    NASFPN_GENOTYPE,
    OPS,
    Cell,
    Genotype,
)

NUM_INPUTS = len(LEVELS)
NUM_OUTPUTS = len(LEVELS)
INTERMEDIATE_LEVELS = tuple(level for level in LEVELS if level != LEVELS[0])
"""Levels an intermediate cell may output at: never P3 (stride 8)."""
GP_VARIANTS = {"mmdet": ("sum", "gp"), "tf": ("sum", "gp_tf"), "both": ("sum", "gp", "gp_tf")}
"""Op sets of the space by global-pooling variant."""
_FIELDS = ("input1", "input2", "level", "op")


def pool_name(index: int) -> str:
    """``P3``..``P7`` for the inputs, ``c0``, ``c1``, ... for cells."""
    return f"P{LEVELS[index]}" if index < NUM_INPUTS else f"c{index - NUM_INPUTS}"


def _pool_index(name: str, where: str) -> int:
    m = re.fullmatch(r"[Pp](\d)|[Cc](\d+)", name.strip())
    if not m:
        raise ValueError(f"{where}: {name!r} is neither an input P3..P7 nor a cell c0, c1, ...")
    if m.group(1) is not None:
        level = int(m.group(1))
        if level not in LEVELS:
            raise ValueError(f"{where}: input P{level} does not exist; inputs are P3..P7")
        return LEVELS.index(level)
    return NUM_INPUTS + int(m.group(2))


@dataclass(frozen=True)
class PaperCell:
    op: str
    inputs: tuple[int, int]
    """Pool indices: 0..4 = P3..P7, 5 + k = cell k."""
    level: int

    def __str__(self) -> str:
        a, b = self.inputs
        return f"{self.op}({pool_name(a)},{pool_name(b)})->P{self.level}"


@dataclass(frozen=True)
class PaperGenotype:
    """A pyramid network as the controller writes it: ``N`` cells, the last five are P3..P7."""

    cells: tuple[PaperCell, ...]

    @property
    def num_cells(self) -> int:
        return len(self.cells)

    @property
    def num_intermediate(self) -> int:
        return len(self.cells) - NUM_OUTPUTS

    @property
    def output_order(self) -> tuple[int, ...]:
        """Levels of the five output cells, in the order they are built (``(3, 4, 5, 7, 6)``)."""
        return tuple(c.level for c in self.cells[self.num_intermediate :])

    def pool_level(self, index: int) -> int:
        return LEVELS[index] if index < NUM_INPUTS else self.cells[index - NUM_INPUTS].level

    # ------------------------------------------------------------------ validation
    def validate(self) -> PaperGenotype:
        """Raise ``ValueError`` with the reason if this is not a valid pyramid network."""
        if len(self.cells) < NUM_OUTPUTS:
            raise ValueError(
                f"a pyramid needs at least {NUM_OUTPUTS} cells (the last five output P3..P7), got {len(self.cells)}"
            )
        n_mid = self.num_intermediate
        for k, cell in enumerate(self.cells):
            where = f"cell c{k} ({cell})"
            if cell.op not in OPS:
                raise ValueError(f"{where}: unknown op {cell.op!r}; choose from {OPS}")
            if len(cell.inputs) != 2:
                raise ValueError(f"{where}: needs exactly 2 inputs")
            a, b = cell.inputs
            for x in (a, b):
                if not 0 <= x < NUM_INPUTS + k:
                    raise ValueError(
                        f"{where}: input {pool_name(x) if x >= 0 else x} is not in the pool yet "
                        f"(pool: P3..P7" + (f", c0..c{k - 1})" if k else ")")
                    )
            if a == b:
                raise ValueError(f"{where}: the two inputs must be different features")
            if cell.level not in LEVELS:
                raise ValueError(f"{where}: output level P{cell.level} is not one of P3..P7")
            if k < n_mid and cell.level not in INTERMEDIATE_LEVELS:
                raise ValueError(
                    f"{where}: intermediate cells output at P4..P7 (never P3, stride 8), got P{cell.level}"
                )
        order = self.output_order
        if sorted(order) != list(LEVELS):
            taken = [f"P{lv}" for lv in order]
            raise ValueError(f"the last five cells must output P3..P7 once each, got {', '.join(taken)}")
        return self

    # ------------------------------------------------------------------ structure
    def summed_unconsumed(self) -> dict[int, tuple[int, ...]]:
        """For each output cell (by cell index), the pool features summed into it because no
        cell had consumed them when it was built."""
        consumers = [0] * NUM_INPUTS
        levels = list(LEVELS)
        extra: dict[int, tuple[int, ...]] = {}
        for k, cell in enumerate(self.cells):
            for x in cell.inputs:
                consumers[x] += 1
            if k >= self.num_intermediate:
                found = tuple(j for j, (n, lv) in enumerate(zip(consumers, levels)) if n == 0 and lv == cell.level)
                for j in found:
                    consumers[j] += 1
                if found:
                    extra[k] = found
            consumers.append(0)
            levels.append(cell.level)
        return extra

    def lower(self) -> Genotype:
        """The node-form ``Genotype`` that ``models.nasfpn`` builds (see the module docstring)."""
        self.validate()
        extra = self.summed_unconsumed()
        node_of = list(range(NUM_INPUTS))  # pool index -> node index
        cells: list[Cell] = []
        for k, cell in enumerate(self.cells):
            a, b = (node_of[x] for x in cell.inputs)
            summed = extra.get(k, ())
            cells.append(Cell(cell.op, (a, b), cell.level, out_conv=not summed))
            for m, j in enumerate(summed):
                previous = NUM_INPUTS + len(cells) - 1
                cells.append(Cell("sum", (node_of[j], previous), cell.level, out_conv=m == len(summed) - 1))
            node_of.append(NUM_INPUTS + len(cells) - 1)
        out_cell = {
            cell.level: NUM_INPUTS + self.num_intermediate + i
            for i, cell in enumerate(self.cells[self.num_intermediate :])
        }
        outputs = tuple(node_of[out_cell[level]] for level in LEVELS)
        return Genotype(tuple(cells), outputs).validate()  # type: ignore[arg-type]

    @classmethod
    def from_genotype(cls, genotype: Genotype) -> PaperGenotype:
        """The paper-form genotype that lowers to ``genotype``; ``ValueError`` if there is none."""
        genotype.validate()
        paper_of_node = {i: i for i in range(NUM_INPUTS)}
        cells: list[PaperCell] = []
        i = 0
        while i < len(genotype.cells):
            cell = genotype.cells[i]
            try:
                inputs = tuple(paper_of_node[x] for x in cell.inputs)
            except KeyError as e:
                raise ValueError(
                    f"not in the paper's form: node cell {i} ({cell}) reads node {e.args[0]}, "
                    "which lies inside a merged output cell"
                ) from None
            last, conv = NUM_INPUTS + i, cell.out_conv
            while not conv:  # an output cell and the sums that add its unconsumed features
                i += 1
                if i >= len(genotype.cells):
                    raise ValueError(f"not in the paper's form: node {last} has no out conv and nothing sums into it")
                s = genotype.cells[i]
                if s.op != "sum" or s.level != cell.level or s.inputs[1] != last:
                    raise ValueError(
                        f"not in the paper's form: node cell {i} ({s}) should be "
                        f"sum(feature, {last})->{cell.level}, adding an unconsumed feature to node {last}"
                    )
                last, conv = NUM_INPUTS + i, s.out_conv
            cells.append(PaperCell(cell.op, inputs, cell.level))  # type: ignore[arg-type]
            paper_of_node[last] = NUM_INPUTS + len(cells) - 1
            i += 1
        paper = cls(tuple(cells)).validate()
        lowered = paper.lower()
        if lowered != genotype:
            raise ValueError(
                f"genotype {genotype.to_string()!r} is not in the paper's form: the closest paper "
                f"genotype {paper.to_string()!r} lowers to {lowered.to_string()!r}"
            )
        return paper

    def canonical(self) -> PaperGenotype:
        """The same network with the inputs of symmetric cells in a fixed order (``sum`` always;
        ``gp_tf`` when the two inputs are at different levels). Equal canonical forms build the
        same function."""
        cells = []
        for cell in self.cells:
            a, b = cell.inputs
            symmetric = cell.op == "sum" or (cell.op == "gp_tf" and self.pool_level(a) != self.pool_level(b))
            cells.append(PaperCell(cell.op, (min(a, b), max(a, b)), cell.level) if symmetric else cell)
        return PaperGenotype(tuple(cells))

    # ------------------------------------------------------------------ serialisation
    def to_string(self) -> str:
        return "; ".join(str(c) for c in self.cells)

    def __str__(self) -> str:
        return self.to_string()

    @classmethod
    def from_string(cls, text: str) -> PaperGenotype:
        """Parse ``"gp(P6,P4)->P4; sum(c0,P4)->P4; ..."`` (the form ``to_string`` writes)."""
        cells: list[PaperCell] = []
        for part in (p.strip() for p in text.split(";")):
            if not part:
                continue
            m = re.fullmatch(r"(\w+)\(\s*(\w+)\s*,\s*(\w+)\s*\)\s*->\s*[Pp]?(\d)", part)
            if not m:
                raise ValueError(f"cannot parse cell {part!r}; expected e.g. 'gp(P6,P4)->P4' or 'sum(c0,P4)->P4'")
            op, a, b, level = m.groups()
            where = f"cell c{len(cells)} ({part})"
            cells.append(PaperCell(op, (_pool_index(a, where), _pool_index(b, where)), int(level)))
        return cls(tuple(cells)).validate()

    def to_dict(self) -> dict:
        return {
            "cells": [{"op": c.op, "inputs": [pool_name(x) for x in c.inputs], "level": c.level} for c in self.cells]
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> PaperGenotype:
        if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
            raise ValueError("paper genotype JSON needs a 'cells' list")
        cells = []
        for k, c in enumerate(data["cells"]):
            where = f"cell c{k}"
            try:
                ins = [x if isinstance(x, int) else _pool_index(str(x), where) for x in c["inputs"]]
                cells.append(PaperCell(str(c["op"]), tuple(ins), int(c["level"])))  # type: ignore[arg-type]
            except (KeyError, TypeError) as e:
                raise ValueError(f"{where}: needs 'op', 'inputs' and 'level' ({e})") from None
        return cls(tuple(cells)).validate()

    @classmethod
    def from_json(cls, text: str) -> PaperGenotype:
        return cls.from_dict(json.loads(text))


def parse_paper_genotype(text: str) -> PaperGenotype:
    """A paper-form genotype from its string or JSON, a named genotype (``"nasfpn"``,
    ``"fpn_cells"``), or a node-form genotype string that has a paper form."""
    text = GENOTYPE_ALIASES.get(text.strip(), text.strip())
    if text in GENOTYPES:
        return PaperGenotype.from_genotype(GENOTYPES[text])
    if text.startswith("{"):
        data = json.loads(text)
        if data.get("outputs") is not None:
            return PaperGenotype.from_genotype(Genotype.from_json(text))
        return PaperGenotype.from_dict(data)
    if re.search(r"\bout\s+\d", text):
        return PaperGenotype.from_genotype(Genotype.from_string(text))
    return PaperGenotype.from_string(text)


# The published architecture and the FPN baseline in the paper's form.
NASFPN_PAPER = PaperGenotype.from_genotype(NASFPN_GENOTYPE)
FPN_CELLS_PAPER = PaperGenotype.from_genotype(FPN_CELLS_GENOTYPE)


# --------------------------------------------------------------------------- the space
@dataclass(frozen=True)
class Decision:
    """One categorical choice of the controller: ``choices`` options, indexed 0..choices-1."""

    cell: int
    field: str
    """``input1``, ``input2``, ``level`` or ``op``."""
    choices: int

    @property
    def name(self) -> str:
        return f"c{self.cell}.{self.field}"


@dataclass(frozen=True)
class SearchSpace:
    """``num_cells`` merging cells per pyramid with ops ``ops`` (the paper: 7 cells, sum + gp).

    A genotype is a list of categorical decisions (``decisions()``), four per cell, with a
    fixed number of options each, and every list of in-range values is a valid genotype, so
    ``size()`` is their product and ``sample`` is uniform over genotypes. Encoding:

    - ``input1``: pool index, ``5 + k`` options;
    - ``input2``: index into the pool without input 1, ``4 + k`` options;
    - ``level``: intermediate cells index P4..P7 (4 options); output cell ``j`` indexes the
      levels the earlier output cells left, in increasing order (``5 - j`` options), so the
      five output decisions spell a permutation;
    - ``op``: index into ``ops``.
    """

    num_cells: int = 7
    ops: tuple[str, ...] = GP_VARIANTS["mmdet"]
    _decisions: tuple[Decision, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.num_cells < NUM_OUTPUTS:
            raise ValueError(f"a search space needs at least {NUM_OUTPUTS} cells per pyramid, got {self.num_cells}")
        if not self.ops or len(set(self.ops)) != len(self.ops) or any(op not in OPS for op in self.ops):
            raise ValueError(f"ops must be distinct names from {OPS}, got {self.ops}")
        decisions = []
        n_mid = self.num_cells - NUM_OUTPUTS
        for k in range(self.num_cells):
            level_choices = len(INTERMEDIATE_LEVELS) if k < n_mid else NUM_OUTPUTS - (k - n_mid)
            decisions += [
                Decision(k, "input1", NUM_INPUTS + k),
                Decision(k, "input2", NUM_INPUTS + k - 1),
                Decision(k, "level", level_choices),
                Decision(k, "op", len(self.ops)),
            ]
        object.__setattr__(self, "_decisions", tuple(decisions))

    @classmethod
    def create(cls, num_cells: int = 7, gp: str = "mmdet") -> SearchSpace:
        """The paper's space with ``num_cells`` cells; ``gp``: ``mmdet``, ``tf`` or ``both``."""
        if gp not in GP_VARIANTS:
            raise ValueError(f"gp variant must be one of {list(GP_VARIANTS)}, got {gp!r}")
        return cls(num_cells, GP_VARIANTS[gp])

    def describe(self) -> dict:
        return {"num_cells": self.num_cells, "ops": list(self.ops)}

    @classmethod
    def from_description(cls, data: dict) -> SearchSpace:
        return cls(int(data["num_cells"]), tuple(data["ops"]))

    def decisions(self) -> tuple[Decision, ...]:
        return self._decisions

    def size(self) -> int:
        """Number of distinct genotypes in the space (exact)."""
        return math.prod(d.choices for d in self._decisions)

    # ------------------------------------------------------------------ membership
    def check(self, genotype: PaperGenotype) -> PaperGenotype:
        """Raise ``ValueError`` if ``genotype`` is invalid or outside this space."""
        genotype.validate()
        if genotype.num_cells != self.num_cells:
            raise ValueError(f"genotype has {genotype.num_cells} cells; this space has {self.num_cells}")
        for k, cell in enumerate(genotype.cells):
            if cell.op not in self.ops:
                raise ValueError(f"cell c{k} ({cell}): op {cell.op!r} is not in this space's ops {self.ops}")
        return genotype

    # ------------------------------------------------------------------ encoding
    def encode(self, genotype: PaperGenotype) -> list[int]:
        """The decision values of ``genotype`` (see the class docstring)."""
        self.check(genotype)
        values: list[int] = []
        n_mid = self.num_cells - NUM_OUTPUTS
        free = list(LEVELS)
        for k, cell in enumerate(genotype.cells):
            a, b = cell.inputs
            if k < n_mid:
                level = INTERMEDIATE_LEVELS.index(cell.level)
            else:
                level = free.index(cell.level)
                free.remove(cell.level)
            values += [a, b - (b > a), level, self.ops.index(cell.op)]
        return values

    def decode(self, values: list[int] | tuple[int, ...]) -> PaperGenotype:
        """The genotype of a list of decision values; ``ValueError`` if one is out of range."""
        values = [int(v) for v in values]
        if len(values) != len(self._decisions):
            raise ValueError(f"expected {len(self._decisions)} decisions, got {len(values)}")
        for d, v in zip(self._decisions, values):
            if not 0 <= v < d.choices:
                raise ValueError(f"decision {d.name} = {v} is out of range 0..{d.choices - 1}")
        n_mid = self.num_cells - NUM_OUTPUTS
        free = list(LEVELS)
        cells = []
        for k in range(self.num_cells):
            a, b, level, op = values[4 * k : 4 * k + 4]
            b = b + (b >= a)
            if k < n_mid:
                lv = INTERMEDIATE_LEVELS[level]
            else:
                lv = free.pop(level)
            cells.append(PaperCell(self.ops[op], (a, b), lv))
        return PaperGenotype(tuple(cells)).validate()

    # ------------------------------------------------------------------ sampling
    def sample(self, rng: np.random.Generator) -> PaperGenotype:
        """A genotype drawn uniformly from the space."""
        return self.decode([int(rng.integers(d.choices)) for d in self._decisions])

    def mutate(self, genotype: PaperGenotype, rng: np.random.Generator) -> PaperGenotype:
        """``genotype`` with one decision changed, drawn uniformly among the cells' fields:
        an input moves to another pool feature (never the other input), an intermediate level
        or an op changes to another value, an output level swaps with another output cell's."""
        self.check(genotype)
        n_mid = self.num_cells - NUM_OUTPUTS
        fields = [(k, f) for k in range(self.num_cells) for f in _FIELDS if f != "op" or len(self.ops) > 1]
        k, what = fields[int(rng.integers(len(fields)))]
        cells = list(genotype.cells)
        cell = cells[k]
        if what in ("input1", "input2"):
            a, b = cell.inputs
            options = [x for x in range(NUM_INPUTS + k) if x not in (a, b)]
            new = options[int(rng.integers(len(options)))]
            cells[k] = PaperCell(cell.op, (new, b) if what == "input1" else (a, new), cell.level)
        elif what == "op":
            ops = [op for op in self.ops if op != cell.op]
            cells[k] = PaperCell(ops[int(rng.integers(len(ops)))], cell.inputs, cell.level)
        elif k < n_mid:
            options = [lv for lv in INTERMEDIATE_LEVELS if lv != cell.level]
            cells[k] = PaperCell(cell.op, cell.inputs, options[int(rng.integers(len(options)))])
        else:
            others = [j for j in range(n_mid, self.num_cells) if j != k]
            j = others[int(rng.integers(len(others)))]
            cells[k] = PaperCell(cell.op, cell.inputs, cells[j].level)
            cells[j] = PaperCell(cells[j].op, cells[j].inputs, cell.level)
        return PaperGenotype(tuple(cells)).validate()
