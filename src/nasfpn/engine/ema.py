"""Exponential moving average (EMA) of a model's weights, with a warm-up of the decay.

After every applied optimizer step (``engine.step.train_step``) each floating-point tensor of the
model's state (parameters and BatchNorm running statistics) is averaged into a copy of the model::

    d_n = decay * (1 - exp(-n / tau))          (n = updates so far, the first one is n = 1)
    ema = d_n * ema + (1 - d_n) * weights

as in ultralytics' ``ModelEMA``: early on ``d_n`` is small, so the average follows the fast-moving
weights of the first steps instead of remembering the random initialisation; after a few ``tau``
steps it is ``decay``. Integer buffers (``num_batches_tracked``) are copied.

In a training checkpoint (``engine.checkpoint``) with EMA on, ``model`` holds the EMA weights, the
ones that are evaluated and written as ``last``/``best.safetensors``, so every reader of the file
gets the weights its metrics describe; ``ema`` holds ``updates`` and ``train_model``, the weights
under training, for an exact resume (``training_weights``, ``ModelEma.load``).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from nasfpn.engine.checkpoint import clean_state_dict

EMA_KEY = "ema"


class ModelEma:
    """An averaged copy (``module``, always in eval mode, no gradients) of ``model``."""

    def __init__(self, model: nn.Module, decay: float, tau: float = 2000.0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema={decay}: the EMA decay must lie in (0, 1), e.g. 0.9998 (0 turns EMA off)")
        if tau < 0:
            raise ValueError(f"train.ema_tau={tau}: the EMA warm-up must be >= 0 steps (0: no warm-up)")
        self.model = model
        self.decay = float(decay)
        self.tau = float(tau)
        self.updates = 0
        self.module = copy.deepcopy(model, _shared_handles(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def decay_at(self, updates: int) -> float:
        """The decay of update number ``updates`` (1-based), warm-up included."""
        if self.tau == 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self) -> None:
        """Average the model's current weights in (after an applied optimizer step)."""
        self.updates += 1
        d = self.decay_at(self.updates)
        # state_dict() tensors share storage with the modules; read each time, so that a module
        # moved since (.to) is still the one averaged.
        ema, live = self.module.state_dict().values(), self.model.state_dict().values()
        ema_float = [v for v in ema if v.is_floating_point()]
        if ema_float:
            torch._foreach_lerp_(ema_float, [v for v in live if v.is_floating_point()], 1.0 - d)
        ema_other = [v for v in ema if not v.is_floating_point()]
        if ema_other:
            torch._foreach_copy_(ema_other, [v for v in live if not v.is_floating_point()])

    def load(self, ckpt: dict[str, Any]) -> None:
        """Continue the average of a training checkpoint; one written without EMA starts it afresh
        from the model's (already restored) weights."""
        entry = ckpt.get(EMA_KEY)
        if entry is None:
            self.module.load_state_dict(self.model.state_dict())
            self.updates = 0
            return
        self.module.load_state_dict(ckpt["model"], strict=True)
        self.updates = int(entry["updates"])


def _shared_handles(model: nn.Module) -> dict[int, Any]:
    """A ``deepcopy`` memo that keeps process groups (SyncBatchNorm's) shared, not copied: they
    cannot be, and the copy, always in eval mode, never communicates."""
    if not torch.distributed.is_available():
        return {}
    group_type = torch.distributed.ProcessGroup
    return {id(v): v for m in model.modules() for v in vars(m).values() if isinstance(v, group_type)}


def checkpoint_weights(model: nn.Module, ema: ModelEma | None) -> dict[str, Any]:
    """The weight entries of a training checkpoint: ``model`` (the EMA weights when on) and, with
    EMA, ``ema`` (``updates``, ``decay``, ``tau`` and ``train_model``)."""
    if ema is None:
        return {"model": clean_state_dict(model.state_dict())}
    return {
        "model": clean_state_dict(ema.module.state_dict()),
        EMA_KEY: {
            "updates": ema.updates,
            "decay": ema.decay,
            "tau": ema.tau,
            "train_model": clean_state_dict(model.state_dict()),
        },
    }


def training_weights(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights under training in a training checkpoint (with EMA on, ``model`` is the average)."""
    entry = ckpt.get(EMA_KEY)
    return entry["train_model"] if entry is not None else ckpt["model"]
