"""Genotypes: text/JSON forms, validation, and that any valid genotype builds, runs and stacks."""

from __future__ import annotations

import random

import pytest
import torch

from nasfpn.models.nasfpn import FPN_CELLS_GENOTYPE, NASFPN, NASFPN_GENOTYPE, Cell, Genotype, parse_genotype, resize_to


def test_discovered_architecture_reproduces_mmdetection_cell_names():
    assert NASFPN_GENOTYPE.cell_names() == [
        "gp_64_4",
        "sum_44_4",
        "sum_43_3",
        "sum_34_4",
        "gp_43_5",
        "sum_55_5",
        "gp_54_7",
        "sum_77_7",
        "gp_75_6",
    ]
    assert [c.out_conv for c in NASFPN_GENOTYPE.cells].count(False) == 2


@pytest.mark.parametrize("g", [NASFPN_GENOTYPE, FPN_CELLS_GENOTYPE])
def test_text_and_json_round_trip(g):
    assert Genotype.from_string(g.to_string()) == g
    assert Genotype.from_json(g.to_json()) == g
    assert parse_genotype(g.to_string()) == g and parse_genotype(g.to_json()) == g


@pytest.mark.parametrize(
    "text, reason",
    [
        ("sum(0,0)->3; out 5,5,5,5,5", "different nodes"),
        ("sum(0,9)->3; out 5,5,5,5,5", "does not exist yet"),
        ("max(0,1)->3; out 5,5,5,5,5", "unknown op"),
        ("sum(0,1)->8; out 5,5,5,5,5", "level 8"),
        ("sum(0,1)->3; sum(1,2)->4", "no 'out"),
        ("sum(0,1)->3; out 5,5,5,5", "5 outputs"),
        ("sum(0,1)->3; sum(0,1)->4; sum(0,1)->5; sum(0,1)->6; sum(0,1)->7; out 6,5,7,8,9", "P3: node 6 is at level 4"),
        ("sum(0,1)->3; out 0,5,6,7,8", "not a cell"),
        ("sum(0 1)->3", "cannot parse"),
    ],
)
def test_invalid_genotypes_are_refused_with_the_reason(text, reason):
    with pytest.raises(ValueError, match=reason):
        Genotype.from_string(text)


def _random_genotype(rng: random.Random, n_cells: int) -> Genotype:
    cells = []
    for i in range(n_cells):
        node = 5 + i
        a, b = rng.sample(range(node), 2)
        level = rng.choice((3, 4, 5, 6, 7)) if i < n_cells - 5 else 3 + (i - (n_cells - 5))
        cells.append(Cell(rng.choice(("sum", "gp", "gp_tf")), (a, b), level, rng.random() > 0.2 or i >= n_cells - 5))
    outputs = tuple(5 + n_cells - 5 + k for k in range(5))
    return Genotype(tuple(cells), outputs).validate()


@pytest.mark.parametrize("seed", range(4))
def test_random_genotypes_build_run_backward_and_stack(seed):
    g = _random_genotype(random.Random(seed), 7 + seed)
    torch.manual_seed(seed)
    neck = NASFPN([16, 24, 32], channels=8, genotype=g, stacks=2)
    feats = [torch.randn(2, c, 128 // s, 128 // s, requires_grad=True) for c, s in ((16, 8), (24, 16), (32, 32))]
    outs = neck(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 8, 128 // s, 128 // s) for s in (8, 16, 32, 64, 128)]
    sum(o.square().mean() for o in outs).backward()
    # Node-form genotypes may leave an input unused; whatever is used gets a finite gradient.
    used = [f for f in feats if f.grad is not None]
    assert used and all(torch.isfinite(f.grad).all() for f in used)
    last = neck.fpn_stages[-1]
    for node in g.outputs:
        cell = getattr(last, last.names[node - 5])
        if cell.out_conv is not None:
            assert cell.out_conv.conv.weight.grad is not None
    assert len(neck.forward_stacks(feats)) == 2


def test_inputs_that_are_no_multiple_of_128_get_the_anchor_grid_sizes():
    # P6 / P7 round up (as the anchors and the FPN's stride-2 convs do): 64 px -> P7 1x1, 320 -> 3x3.
    neck = NASFPN([16, 24, 32], channels=8, stacks=1).eval()
    for side, expected in ((64, [8, 4, 2, 1, 1]), (320, [40, 20, 10, 5, 3])):
        out = neck([torch.randn(1, c, side // s, side // s) for c, s in ((16, 8), (24, 16), (32, 32))])
        assert [tuple(p.shape[-2:]) for p in out] == [(n, n) for n in expected]


def test_odd_sizes_resize_like_mmcv():
    x = torch.arange(1, 26, dtype=torch.float32).reshape(1, 1, 5, 5)
    down = resize_to(x, (2, 2))  # padded to 6x6 (1 row/col before... split as mmcv), then 3x3 max-pool
    assert down.shape == (1, 1, 2, 2)
    assert down.flatten().tolist() == [13.0, 15.0, 23.0, 25.0]
    up = resize_to(torch.ones(1, 1, 2, 3), (4, 6))
    assert up.shape == (1, 1, 4, 6)


def test_checkpointed_stacks_match_and_count_bn_statistics_once():
    torch.manual_seed(0)
    feats = [torch.randn(2, c, 128 // s, 128 // s) for c, s in ((16, 8), (24, 16), (32, 32))]
    plain = NASFPN([16, 24, 32], channels=8, stacks=2)
    ckpt = NASFPN([16, 24, 32], channels=8, stacks=2, checkpoint_stacks=True)
    ckpt.load_state_dict(plain.state_dict())
    for neck in (plain, ckpt):
        neck.train()
        sum(o.sum() for o in neck(feats)).backward()
    for (n, a), (_, b) in zip(plain.state_dict().items(), ckpt.state_dict().items()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), n
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert (a.grad is None) == (b.grad is None), n
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-5), n
