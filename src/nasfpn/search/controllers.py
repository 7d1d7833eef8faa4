"""Search controllers: random search, regularised (aging) evolution and the paper's RNN + PPO.

Every controller has the same small interface::

    genotype = controller.propose()          # a PaperGenotype of the controller's space
    controller.observe(genotype, reward)     # its proxy reward, in any order, any time later
    state = controller.state_dict()          # plain data (tensors, numbers, strings, lists)
    controller.load_state_dict(state)

``propose`` may be called several times before the matching ``observe`` calls (asynchronous
search keeps several trials in flight), and ``observe`` accepts genotypes in any order. All
randomness comes from the controller's own seeded generator, so the same seed and the same
sequence of calls give the same proposals; ``state_dict`` captures everything, so a restored
controller continues exactly as the original would have.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
from torch import nn

from nasfpn.search.space import PaperGenotype, SearchSpace


class Controller(ABC):
    """Proposes genotypes of ``space`` and learns from their rewards."""

    kind: str = ""

    def __init__(self, space: SearchSpace, seed: int = 0) -> None:
        self.space = space
        self.seed = seed

    @abstractmethod
    def propose(self) -> PaperGenotype: ...

    @abstractmethod
    def observe(self, genotype: PaperGenotype, reward: float) -> None: ...

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    return dict(rng.bit_generator.state)


def _set_rng_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    rng.bit_generator.state = state


class RandomSearch(Controller):
    """Genotypes drawn uniformly from the space; rewards are ignored."""

    kind = "random"

    def __init__(self, space: SearchSpace, seed: int = 0) -> None:
        super().__init__(space, seed)
        self.rng = np.random.default_rng(seed)

    def propose(self) -> PaperGenotype:
        return self.space.sample(self.rng)

    def observe(self, genotype: PaperGenotype, reward: float) -> None:
        self.space.check(genotype)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "rng": _rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _set_rng_state(self.rng, state["rng"])


class RegularizedEvolution(Controller):
    """Aging evolution (Real et al., AAAI 2019).

    Until ``population_size`` rewards have been observed, proposals are uniform samples. Then
    each proposal samples ``sample_size`` members of the population (without replacement),
    takes the best and changes one of its decisions (``SearchSpace.mutate``). Every observed
    child joins the population and the oldest member leaves, so the population is always the
    ``population_size`` most recent results.
    """

    kind = "evolution"

    def __init__(self, space: SearchSpace, seed: int = 0, population_size: int = 10, sample_size: int = 3) -> None:
        super().__init__(space, seed)
        if population_size < 1 or not 1 <= sample_size <= population_size:
            raise ValueError(
                f"need population_size >= 1 and 1 <= sample_size <= population_size, "
                f"got {population_size}, {sample_size}"
            )
        self.population_size = population_size
        self.sample_size = sample_size
        self.rng = np.random.default_rng(seed)
        self.population: list[tuple[PaperGenotype, float]] = []  # oldest first
        self.observed = 0

    def propose(self) -> PaperGenotype:
        if self.observed < self.population_size:
            return self.space.sample(self.rng)
        picks = self.rng.choice(len(self.population), size=self.sample_size, replace=False)
        # Best reward wins; on a tie the younger member (larger index).
        parent = max((int(i) for i in picks), key=lambda i: (self.population[i][1], i))
        return self.space.mutate(self.population[parent][0], self.rng)

    def observe(self, genotype: PaperGenotype, reward: float) -> None:
        self.space.check(genotype)
        self.population.append((genotype, float(reward)))
        if len(self.population) > self.population_size:
            self.population.pop(0)
        self.observed += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "rng": _rng_state(self.rng),
            "population": [[g.to_string(), r] for g, r in self.population],
            "observed": self.observed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _set_rng_state(self.rng, state["rng"])
        self.population = [(PaperGenotype.from_string(g), float(r)) for g, r in state["population"]]
        self.observed = int(state["observed"])


@contextlib.contextmanager
def _one_thread():
    """The policy's tensors are tiny: intra-op threads only add overhead (and, on a busy machine,
    seconds of contention per update)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class PolicyNetwork(nn.Module):
    """An LSTM that writes a genotype one decision at a time, one softmax per decision.

    The input at step ``t`` is the embedding of the value chosen at step ``t - 1`` (a learned
    start vector at ``t = 0``); decision ``t`` has its own embedding table and output layer.
    Output layers start at zero, so the first policy is uniform over the space.
    """

    def __init__(self, choices: list[int], hidden: int = 64) -> None:
        super().__init__()
        self.choices = list(choices)
        self.hidden = hidden
        self.start = nn.Parameter(torch.zeros(1, hidden))
        self.lstm = nn.LSTMCell(hidden, hidden)
        self.embeddings = nn.ModuleList(nn.Embedding(n, hidden) for n in self.choices)
        heads = [nn.Linear(hidden, n) for n in self.choices]
        for head in heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.heads = nn.ModuleList(heads)

    def _steps(self, batch: int):
        h = torch.zeros(batch, self.hidden)
        c = torch.zeros(batch, self.hidden)
        x = self.start.expand(batch, -1)
        for t in range(len(self.choices)):
            h, c = self.lstm(x, (h, c))
            value = yield self.heads[t](h)  # (batch, choices[t]) logits
            x = self.embeddings[t](value)

    def sample(self, generator: torch.Generator) -> tuple[list[int], float]:
        """Decision values drawn from the policy, and their total log-probability."""
        values: list[int] = []
        logp = 0.0
        steps = self._steps(1)
        logits = next(steps)
        while True:
            probs = torch.softmax(logits[0], dim=-1)
            v = int(torch.multinomial(probs, 1, generator=generator))
            values.append(v)
            logp += float(torch.log(probs[v]))
            try:
                logits = steps.send(torch.tensor([v]))
            except StopIteration:
                return values, logp

    def log_prob_entropy(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``values`` int64 ``(B, T)`` -> total log-probability ``(B,)`` and entropy ``(B,)``."""
        logps, ents = [], []
        steps = self._steps(values.shape[0])
        logits = next(steps)
        for t in range(len(self.choices)):
            log_p = torch.log_softmax(logits, dim=-1)
            logps.append(log_p.gather(1, values[:, t : t + 1]).squeeze(1))
            ents.append(-(log_p.exp() * log_p).sum(-1))
            try:
                logits = steps.send(values[:, t])
            except StopIteration:
                break
        return torch.stack(logps, 1).sum(1), torch.stack(ents, 1).sum(1)


class PPOController(Controller):
    """The paper's controller: an RNN policy over the decisions, trained with PPO.

    Reward is the proxy AP; the advantage is reward minus an exponential moving average of past
    rewards (``baseline_decay``). Every ``batch_size`` observed rewards, the policy takes
    ``epochs`` Adam steps on the clipped surrogate objective (``clip``) over that batch, plus an
    entropy bonus (``entropy_weight``). The behaviour log-probability of each proposal is kept
    from the moment it was sampled, so proposals made by an older policy (asynchronous search)
    are weighted correctly.
    """

    kind = "ppo"

    def __init__(
        self,
        space: SearchSpace,
        seed: int = 0,
        hidden: int = 64,
        lr: float = 3e-3,
        batch_size: int = 8,
        epochs: int = 4,
        clip: float = 0.2,
        entropy_weight: float = 1e-3,
        baseline_decay: float = 0.8,
    ) -> None:
        super().__init__(space, seed)
        if batch_size < 1 or epochs < 1:
            raise ValueError(f"need batch_size >= 1 and epochs >= 1, got {batch_size}, {epochs}")
        self.batch_size, self.epochs, self.clip = batch_size, epochs, clip
        self.entropy_weight, self.baseline_decay = entropy_weight, baseline_decay
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.policy = PolicyNetwork([d.choices for d in space.decisions()], hidden)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.baseline: float | None = None
        self.pending: dict[str, list[float]] = {}  # genotype -> behaviour log-probs of its open proposals
        self.buffer: list[tuple[list[int], float, float]] = []  # (values, behaviour log-prob, advantage)
        self.updates = 0
        self.last_stats: dict[str, float] = {}

    def propose(self) -> PaperGenotype:
        with torch.no_grad(), _one_thread():
            values, logp = self.policy.sample(self.generator)
        genotype = self.space.decode(values)
        self.pending.setdefault(genotype.to_string(), []).append(logp)
        return genotype

    def observe(self, genotype: PaperGenotype, reward: float) -> None:
        values = self.space.encode(genotype)
        key = genotype.to_string()
        if self.pending.get(key):
            logp = self.pending[key].pop(0)
            if not self.pending[key]:
                del self.pending[key]
        else:  # not proposed by this controller: treat the current policy as the behaviour policy
            with torch.no_grad(), _one_thread():
                logp = float(self.policy.log_prob_entropy(torch.tensor([values]))[0][0])
        reward = float(reward)
        if self.baseline is None:
            self.baseline = reward
        advantage = reward - self.baseline
        self.baseline = self.baseline_decay * self.baseline + (1 - self.baseline_decay) * reward
        self.buffer.append((values, logp, advantage))
        if len(self.buffer) >= self.batch_size:
            with _one_thread():
                self._update()

    def _update(self) -> None:
        values = torch.tensor([b[0] for b in self.buffer])
        old_logp = torch.tensor([b[1] for b in self.buffer])
        adv = torch.tensor([b[2] for b in self.buffer])
        for _ in range(self.epochs):
            logp, entropy = self.policy.log_prob_entropy(values)
            ratio = torch.exp(logp - old_logp)
            surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - self.clip, 1 + self.clip) * adv)
            loss = -surrogate.mean() - self.entropy_weight * entropy.mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        self.last_stats = {
            "loss": float(loss.detach()),
            "entropy": float(entropy.detach().mean()),
            "mean_advantage": float(adv.mean()),
        }
        self.buffer = []
        self.updates += 1

    def entropy(self) -> float:
        """Entropy of the current policy (nats, summed over decisions; the uniform policy has
        ``log(space.size())``), estimated from 64 samples."""
        g = torch.Generator().manual_seed(0)
        with torch.no_grad(), _one_thread():
            values = torch.tensor([self.policy.sample(g)[0] for _ in range(64)])
            return float(self.policy.log_prob_entropy(values)[1].mean())

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "baseline": self.baseline,
            "pending": {k: list(v) for k, v in self.pending.items()},
            "buffer": [[list(v), lp, a] for v, lp, a in self.buffer],
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.baseline = state["baseline"]
        self.pending = {k: list(v) for k, v in state["pending"].items()}
        self.buffer = [(list(v), float(lp), float(a)) for v, lp, a in state["buffer"]]
        self.updates = int(state["updates"])


CONTROLLERS = {"random": RandomSearch, "evolution": RegularizedEvolution, "ppo": PPOController}


def build_controller(kind: str, space: SearchSpace, seed: int = 0, **options: Any) -> Controller:
    """``kind``: ``random``, ``evolution`` or ``ppo``; ``options`` go to its constructor."""
    if kind not in CONTROLLERS:
        raise ValueError(f"unknown controller {kind!r}; choose from {list(CONTROLLERS)}")
    return CONTROLLERS[kind](space, seed, **options)


def uniform_entropy(space: SearchSpace) -> float:
    """Entropy of the uniform policy over ``space`` (nats)."""
    return math.log(space.size())
