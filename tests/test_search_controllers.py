"""Controllers: one interface, seeded and reproducible, resumable through state_dict."""

import io

import numpy as np
import pytest
import torch

from nasfpn.search.controllers import (
    PPOController,
    RandomSearch,
    RegularizedEvolution,
    build_controller,
    uniform_entropy,
)
from nasfpn.search.space import FPN_CELLS_PAPER, NASFPN_PAPER, PaperGenotype, SearchSpace

SPACE = SearchSpace()
KINDS = ["random", "evolution", "ppo"]
OPTIONS = {"random": {}, "evolution": {"population_size": 6, "sample_size": 2}, "ppo": {"batch_size": 4}}


def reward_of(g: PaperGenotype) -> float:
    """A toy objective: the fraction of gp cells plus a bonus for the published output order."""
    return sum(c.op == "gp" for c in g.cells) / len(g.cells) + 0.5 * (g.output_order == NASFPN_PAPER.output_order)


def drive(controller, steps: int, in_flight: int = 3) -> list[str]:
    """Asynchronous use: keep ``in_flight`` proposals open, observe the oldest first."""
    open_, seen = [], []
    for _ in range(steps):
        while len(open_) < in_flight:
            g = controller.propose()
            open_.append(g)
            seen.append(g.to_string())
        g = open_.pop(0)
        controller.observe(g, reward_of(g))
    return seen


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_proposals(kind):
    a = drive(build_controller(kind, SPACE, 7, **OPTIONS[kind]), 14)
    b = drive(build_controller(kind, SPACE, 7, **OPTIONS[kind]), 14)
    c = drive(build_controller(kind, SPACE, 8, **OPTIONS[kind]), 14)
    assert a == b
    assert a != c
    for text in a:
        SPACE.check(PaperGenotype.from_string(text))


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_resumes_exactly(kind):
    ref = build_controller(kind, SPACE, 3, **OPTIONS[kind])
    first = drive(ref, 9, in_flight=1)
    state = roundtrip(ref.state_dict())
    rest = drive(ref, 9, in_flight=1)

    restored = build_controller(kind, SPACE, 3, **OPTIONS[kind])
    restored.load_state_dict(state)
    assert drive(restored, 9, in_flight=1) == rest
    assert first != rest


def test_evolution_is_aging_evolution():
    evo = RegularizedEvolution(SPACE, 0, population_size=4, sample_size=2)
    for _ in range(10):
        g = evo.propose()
        evo.observe(g, reward_of(g))
    assert len(evo.population) == 4 and evo.observed == 10
    # After the first population, every proposal is one mutation away from a member.
    parents = {g.to_string() for g, _ in evo.population}
    child = evo.propose()
    assert any(
        sum(a != b for a, b in zip(SPACE.encode(child), SPACE.encode(PaperGenotype.from_string(p)))) <= 4
        for p in parents
    )
    with pytest.raises(ValueError):
        RegularizedEvolution(SPACE, 0, population_size=2, sample_size=3)


def test_ppo_starts_uniform_and_learns():
    ppo = PPOController(SPACE, 0, batch_size=8, lr=2e-2, epochs=4)
    assert ppo.entropy() == pytest.approx(uniform_entropy(SPACE), rel=1e-4)
    rewards = []
    for _ in range(20):
        batch = [ppo.propose() for _ in range(8)]
        for g in batch:
            rewards.append(reward_of(g))
            ppo.observe(g, rewards[-1])
    assert ppo.updates == 20
    assert np.mean(rewards[-40:]) > np.mean(rewards[:40]) + 0.1
    assert ppo.entropy() < uniform_entropy(SPACE)


def test_ppo_accepts_foreign_genotypes_and_out_of_order_results():
    ppo = PPOController(SPACE, 0, batch_size=3)
    a, b = ppo.propose(), ppo.propose()
    ppo.observe(b, 0.2)
    ppo.observe(NASFPN_PAPER, 0.9)  # never proposed: behaviour policy = current policy
    ppo.observe(a, 0.1)
    assert ppo.updates == 1 and not ppo.pending


def test_random_search_ignores_rewards_but_checks_genotypes():
    rs = RandomSearch(SPACE, 0)
    with pytest.raises(ValueError, match="8 cells"):
        rs.observe(FPN_CELLS_PAPER, 1.0)


def test_unknown_controller():
    with pytest.raises(ValueError, match="unknown controller"):
        build_controller("bayes", SPACE)
