"""The paper-form search space: lowering, round trips, validation, size, sampling, mutation."""

import math

import numpy as np
import pytest
import torch

from nasfpn.core.config import BackboneConfig, HeadConfig, ModelConfig, NeckConfig
from nasfpn.models import build_model
from nasfpn.models.nasfpn import FPN_CELLS_GENOTYPE, NASFPN, NASFPN_GENOTYPE, Genotype
from nasfpn.search.space import (
    FPN_CELLS_PAPER,
    NASFPN_PAPER,
    PaperCell,
    PaperGenotype,
    SearchSpace,
    parse_paper_genotype,
)

# Small tensors on a shared 2-core machine: one thread avoids contention.
pytestmark = pytest.mark.usefixtures("one_thread")


PUBLISHED = "gp(P6,P4)->P4; sum(c0,P4)->P4; sum(c1,P3)->P3; sum(c2,c1)->P4; gp(c3,c2)->P5; gp(c4,c1)->P7; gp(c5,c4)->P6"


def test_published_architecture_round_trips():
    paper = PaperGenotype.from_string(PUBLISHED)
    assert paper.num_cells == 7 and paper.output_order == (3, 4, 5, 7, 6)
    lowered = paper.lower()
    assert lowered == NASFPN_GENOTYPE
    assert lowered.cell_names() == NASFPN_GENOTYPE.cell_names()
    # The unconsumed P5 and P7 inputs are summed into the P5 and P7 outputs, as MMDetection writes
    # sum_55_5 and sum_77_7.
    assert paper.summed_unconsumed() == {4: (2,), 5: (4,)}
    assert PaperGenotype.from_genotype(NASFPN_GENOTYPE) == paper == NASFPN_PAPER
    # Same modules, same state-dict keys.
    keys = lambda g: sorted(NASFPN([8, 8, 8], 8, g, stacks=1).state_dict())  # noqa: E731
    assert keys(lowered) == keys(NASFPN_GENOTYPE)


def test_fpn_has_a_paper_form():
    assert FPN_CELLS_PAPER.num_cells == 8 and FPN_CELLS_PAPER.lower() == FPN_CELLS_GENOTYPE
    assert FPN_CELLS_PAPER.summed_unconsumed() == {}


@pytest.mark.parametrize(
    "text", ["nasfpn", "fpn_cells", "fpn", PUBLISHED, NASFPN_GENOTYPE.to_string(), NASFPN_PAPER.to_json()]
)
def test_parse_paper_genotype_forms(text):
    g = parse_paper_genotype(text)
    assert PaperGenotype.from_string(g.to_string()) == g
    assert PaperGenotype.from_json(g.to_json()) == g


@pytest.mark.parametrize(
    "text, reason",
    [
        (
            "gp(P6,P4)->P4; sum(c1,P4)->P4; sum(c1,P3)->P3; sum(c2,c1)->P4; gp(c3,c2)->P5; gp(c4,c1)->P7; gp(c5,c4)->P6",
            "not in the pool yet",
        ),
        (
            "gp(P4,P4)->P4; sum(c0,P4)->P4; sum(c1,P3)->P3; sum(c2,c1)->P4; gp(c3,c2)->P5; gp(c4,c1)->P7; gp(c5,c4)->P6",
            "must be different",
        ),
        (
            "gp(P6,P4)->P3; sum(c0,P4)->P4; sum(c1,P3)->P3; sum(c2,c1)->P4; gp(c3,c2)->P5; gp(c4,c1)->P7; gp(c5,c4)->P6",
            "never P3",
        ),
        (
            "gp(P6,P4)->P4; sum(c0,P4)->P4; sum(c1,P3)->P3; sum(c2,c1)->P4; gp(c3,c2)->P5; gp(c4,c1)->P7; gp(c5,c4)->P7",
            "P3..P7 once each",
        ),
        (
            "max(P6,P4)->P4; sum(c0,P4)->P4; sum(c1,P3)->P3; sum(c2,c1)->P4; gp(c3,c2)->P5; gp(c4,c1)->P7; gp(c5,c4)->P6",
            "unknown op",
        ),
        ("sum(P3,P4)->P3; sum(P4,P5)->P4; sum(P5,P6)->P5; sum(P6,P7)->P6", "at least 5 cells"),
        ("sum(P3,P9)->P3", "does not exist"),
        ("sum(P3 P4)->P3", "cannot parse"),
    ],
)
def test_invalid_genotypes_are_refused_with_a_reason(text, reason):
    with pytest.raises(ValueError, match=reason):
        PaperGenotype.from_string(text)


def test_node_genotypes_outside_the_paper_form_are_refused():
    # An intermediate cell without out conv has no paper form.
    g = Genotype.from_string(NASFPN_GENOTYPE.to_string().replace("sum(5,1)->4", "sum(5,1)->4 noconv"))
    with pytest.raises(ValueError, match="paper"):
        PaperGenotype.from_genotype(g)


def test_space_membership():
    space = SearchSpace()
    space.check(NASFPN_PAPER)
    with pytest.raises(ValueError, match="8 cells"):
        space.check(FPN_CELLS_PAPER)
    tf_space = SearchSpace.create(7, "tf")
    with pytest.raises(ValueError, match="not in this space"):
        tf_space.check(NASFPN_PAPER)
    with pytest.raises(ValueError, match="gp variant"):
        SearchSpace.create(7, "avg")


def _size_by_formula(n_cells: int, n_ops: int) -> int:
    inputs = math.prod((5 + k) * (4 + k) for k in range(n_cells))
    return inputs * n_ops**n_cells * 4 ** (n_cells - 5) * math.factorial(5)


def test_space_size_is_exact():
    assert SearchSpace().size() == 247_210_809_753_600_000 == _size_by_formula(7, 2)
    assert SearchSpace.create(7, "both").size() == _size_by_formula(7, 3)
    assert SearchSpace(5, ("sum",)).size() == _size_by_formula(5, 1)
    assert SearchSpace(9).size() == _size_by_formula(9, 2)


def test_encoding_is_a_bijection():
    space = SearchSpace.create(7, "both")
    rng = np.random.default_rng(0)
    seen = {}
    for _ in range(300):
        values = [int(rng.integers(d.choices)) for d in space.decisions()]
        g = space.decode(values)
        assert space.encode(g) == values
        seen[tuple(values)] = g
    assert len(set(seen.values())) == len(seen)  # distinct decisions -> distinct genotypes
    assert space.decode(space.encode(NASFPN_PAPER.canonical())) == NASFPN_PAPER.canonical()
    with pytest.raises(ValueError, match="out of range"):
        space.decode([99] * len(space.decisions()))


def test_sampling_is_uniform_per_decision():
    space = SearchSpace()
    rng = np.random.default_rng(1)
    values = np.array([space.encode(space.sample(rng)) for _ in range(2000)])
    # The P3..P7 permutation: the first output cell picks each level a fifth of the time.
    first_output_level = values[:, 4 * 2 + 2]
    counts = np.bincount(first_output_level, minlength=5) / len(values)
    assert np.all(np.abs(counts - 0.2) < 0.04)


def _cell_fields(g: PaperGenotype) -> list:
    return [
        (k, f, v)
        for k, c in enumerate(g.cells)
        for f, v in (("a", c.inputs[0]), ("b", c.inputs[1]), ("level", c.level), ("op", c.op))
    ]


def test_mutation_changes_one_decision():
    space = SearchSpace()
    rng = np.random.default_rng(2)
    g = NASFPN_PAPER
    for _ in range(200):
        child = space.mutate(g, rng)
        space.check(child)
        diff = [x for x, y in zip(_cell_fields(g), _cell_fields(child)) if x != y]
        if len(diff) == 2:  # output levels swapped between two output cells
            assert {d[1] for d in diff} == {"level"} and all(d[0] >= g.num_intermediate for d in diff)
        else:
            assert len(diff) == 1
        g = child


def test_canonical_form_ignores_the_order_of_sum_inputs():
    a = PaperGenotype.from_string(PUBLISHED)
    b = PaperGenotype.from_string(PUBLISHED.replace("sum(c0,P4)", "sum(P4,c0)"))
    c = PaperGenotype.from_string(PUBLISHED.replace("gp(P6,P4)", "gp(P4,P6)"))
    assert a != b and a.canonical() == b.canonical()
    assert a.canonical() != c.canonical()  # gp is not symmetric


@pytest.mark.parametrize("gp", ["mmdet", "tf", "both"])
def test_random_genotypes_build_run_backward_and_stack(gp):
    space = SearchSpace.create(7, gp)
    rng = np.random.default_rng({"mmdet": 0, "tf": 1, "both": 2}[gp])
    torch.manual_seed(0)
    feats = [torch.randn(2, 4, s, s) for s in (16, 8, 4)]  # C3..C5 of a 128 px image
    for _ in range(8):
        genotype = space.sample(rng).lower()
        neck = NASFPN([4, 4, 4], 8, genotype, stacks=2)
        stacks = neck.forward_stacks(feats)
        assert len(stacks) == 2
        for pyramid in stacks:
            assert [tuple(p.shape) for p in pyramid] == [(2, 8, s, s) for s in (16, 8, 4, 2, 1)]
        sum(p.square().mean() for p in stacks[-1]).backward()
        grads = [p.grad for p in neck.fpn_stages.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_random_genotype_in_a_tiny_detector():
    genotype = SearchSpace().sample(np.random.default_rng(3)).lower()
    cfg = ModelConfig(
        backbone=BackboneConfig(depth=10, frozen_stages=0, pretrained=None),
        neck=NeckConfig(kind="nasfpn", channels=8, stacks=2, genotype=genotype.to_string()),
        head=HeadConfig(num_classes=3, stacked_convs=1, feat_channels=8),
    )
    model = build_model(cfg, pretrained_backbone=False)
    torch.manual_seed(0)
    images = torch.randn(2, 3, 128, 128)  # BN needs 2 values per channel at P7 (1x1)
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 60.0, 50.0]]), "labels": torch.tensor([1])}] * 2
    outputs = model(images)
    loss = sum(v.sum() for v in model.loss(outputs, targets).values())
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.neck.parameters())
    early = model(images, stacks=1)
    assert [m.shape for m in early[0]] == [m.shape for m in outputs[0]]


def test_paper_cell_names_pool_features():
    assert str(PaperCell("gp", (3, 1), 4)) == "gp(P6,P4)->P4"
    assert str(PaperCell("sum", (5, 1), 4)) == "sum(c0,P4)->P4"
