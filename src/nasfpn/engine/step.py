"""One training step, the same for the trainer, ``nasfpn bench --mode train`` and the demo's timing.

``train_step`` runs: learning rate of the step -> zero gradients -> copy of the buffers (BatchNorm
running statistics) -> forward + loss (``TrainStep``: the network under autocast, the loss in
float32) -> backward (through the fp16 ``GradScaler`` when it is enabled) -> unscale -> gradient
norm, clipped to ``grad_clip`` when that is > 0 -> finiteness check -> optimizer step -> EMA of the
weights (``train.ema``, ``engine.ema``).

A step whose loss terms (or, without fp16 loss scaling, gradient norm) are not finite on any rank
is skipped: no update, the buffers put back, gradients dropped. With fp16 an overflowing gradient
is the scaler's business (it skips the update itself and lowers the scale).

Per step there is one host-device synchronisation: reading the step's values (one small tensor of
named values, all-reduced first under DDP), needed to decide whether the step is applied.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nasfpn.core.config import TrainConfig
from nasfpn.core.precision import autocast_dtype
from nasfpn.engine import distributed as D
from nasfpn.engine.ema import ModelEma
from nasfpn.engine.optim import build_optimizer
from nasfpn.engine.schedule import set_lr
from nasfpn.models import RetinaNet

LOSS_KEYS = ("loss", "loss_cls", "loss_bbox")

Batch = tuple[torch.Tensor, list[dict[str, Any]]]
"""``(images (N, 3, H, W) float32, targets)`` as ``data.collate.collate_train`` makes them."""


class TrainStep(nn.Module):
    """Forward + loss in one module, so DistributedDataParallel sees the whole training graph.

    ``forward(images, targets)`` returns the loss dict of ``RetinaNet.loss``. The network runs
    under autocast when ``amp`` is set; the loss is computed in float32. With deep supervision
    the loss terms are the means over the stacks' exits.
    """

    def __init__(self, model: RetinaNet, amp: str = "none", deep_supervision: bool = False) -> None:
        super().__init__()
        self.model = model
        self.amp_dtype = autocast_dtype(amp)  # ValueError for an unknown precision
        self.deep_supervision = deep_supervision and getattr(model, "num_stacks", 1) > 1

    def forward(self, images: torch.Tensor, targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        with torch.autocast(images.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            if self.deep_supervision:
                exits = self.model.forward_stacks(images)
            else:  # every stack trains, also when inference exits early (model.neck.exit_stack)
                exits = [self.model(images, getattr(self.model, "num_stacks", None))]
        losses = []
        for cls_maps, reg_maps in exits:
            outputs = ([m.float() for m in cls_maps], [m.float() for m in reg_maps])
            losses.append(self.model.loss(outputs, targets))
        if len(losses) == 1:
            return losses[0]
        out = dict(losses[-1])
        for key in ("loss", "loss_cls", "loss_bbox", "loss_cls_levels", "loss_bbox_levels"):
            out[key] = torch.stack([exit_losses[key] for exit_losses in losses]).mean(dim=0)
        return out


@dataclass(frozen=True)
class StepSettings:
    """How a step runs: ``grad_clip`` (max total gradient norm, 0: none; the norm is measured
    anyway), ``channels_last`` images, and the ``world_size`` the step's values are averaged over."""

    grad_clip: float = 0.0
    channels_last: bool = False
    world_size: int = 1

    @classmethod
    def from_config(cls, t: TrainConfig, world_size: int = 1) -> StepSettings:
        return cls(grad_clip=t.grad_clip, channels_last=t.channels_last, world_size=world_size)


class BufferBackup:
    """A preallocated copy of a model's buffers (BatchNorm running statistics): saved before each
    step, put back when the step is skipped, so a non-finite batch leaves no trace in the model."""

    def __init__(self, model: nn.Module) -> None:
        self.buffers = list(model.buffers())
        self.copy = [b.detach().clone() for b in self.buffers]

    def save(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.copy, self.buffers)

    def restore(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.copy)


@dataclass(frozen=True)
class StepResult:
    """What one step did. Loss terms, ``num_pos`` and ``grad_norm`` (before clipping) are means
    over the ranks; a non-finite term on any rank shows as nan or inf here."""

    applied: bool
    """False: a loss term or the gradient was not finite; nothing was updated."""
    lr: float
    loss: float
    loss_cls: float
    loss_bbox: float
    num_pos: float
    grad_norm: float
    stop: bool = False
    """Some rank's ``stop()`` asked to end the run after this step."""

    def losses(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in LOSS_KEYS}


def move_batch(batch: Batch, device: torch.device, channels_last: bool = False) -> Batch:
    """The batch on ``device`` (non-blocking from pinned memory), images channels-last if asked."""
    images, targets = batch
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = [
        {**t, "boxes": t["boxes"].to(device, non_blocking=True), "labels": t["labels"].to(device, non_blocking=True)}
        for t in targets
    ]
    return images, targets


def reduce_named(values: dict[str, torch.Tensor], world_size: int = 1) -> dict[str, float]:
    """Sum each named scalar over the ranks in one all-reduce, and read them in one host sync.
    Every rank must pass the same names in the same order."""
    names = list(values)
    vec = torch.stack([values[k].detach().float().reshape(()) for k in names])
    if world_size > 1:
        D.all_reduce_sum(vec)
    return dict(zip(names, vec.tolist()))


@dataclass
class StepParts:
    """What a training step works on; ``build_step_parts`` makes them alike for every caller."""

    loss_module: nn.Module
    """A ``TrainStep`` (the trainer replaces it by its DDP wrapper under torchrun)."""
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    """Enabled for fp16 only."""
    backup: BufferBackup
    settings: StepSettings
    ema: ModelEma | None = None
    """The average of the weights (``train.ema`` > 0), updated after every applied step."""


def build_step_parts(
    model: RetinaNet, t: TrainConfig, lr: float, deep_supervision: bool = False, world_size: int = 1
) -> StepParts:
    """The parts of the trainer's step for ``model`` (on its device) under train config ``t``:
    ``TrainStep`` with ``t.amp``, SGD with the trainer's parameter groups, the scaler, the buffer
    backup, the step settings and, with ``t.ema``, the weights' EMA."""
    loss_module = TrainStep(model, t.amp, deep_supervision)
    device = next(model.parameters()).device
    return StepParts(
        loss_module=loss_module,
        optimizer=build_optimizer(model, t, lr),
        scaler=torch.amp.GradScaler(device.type, enabled=t.amp == "fp16"),
        backup=BufferBackup(model),
        settings=StepSettings.from_config(t, world_size),
        ema=ModelEma(model, t.ema, t.ema_tau) if t.ema else None,
    )


def train_step(parts: StepParts, batch: Batch, lr: float, stop: Callable[[], bool] | None = None) -> StepResult:
    """One optimizer step on ``batch`` at learning rate ``lr`` (the schedule's value for this step).

    ``stop``: asked after the backward pass; its answer travels in the step's all-reduce, so
    every rank stops after the same step.
    """
    optimizer, scaler, backup, settings = parts.optimizer, parts.scaler, parts.backup, parts.settings
    params = [p for g in optimizer.param_groups for p in g["params"]]
    images, targets = move_batch(batch, params[0].device, settings.channels_last)
    set_lr(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)
    backup.save()

    losses = parts.loss_module(images, targets)
    scaler.scale(losses["loss"]).backward()
    scaler.unscale_(optimizer)
    if settings.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    terms = torch.stack([losses[k].detach().float() for k in LOSS_KEYS])
    bad = (~torch.isfinite(terms)).any()
    if not scaler.is_enabled():  # with fp16 an overflow is the scaler's business
        bad = bad | ~torch.isfinite(grad_norm)
    # Every rank sends the same names, "stop" included, so the all-reduce lines up.
    shared = {
        **{k: terms[i] for i, k in enumerate(LOSS_KEYS)},
        "num_pos": losses["num_pos"],
        "grad_norm": grad_norm,
        "bad": bad,
        "stop": torch.tensor(float(stop is not None and stop()), device=terms.device),
    }
    vals = reduce_named(shared, settings.world_size)  # the one host sync of the step
    world = settings.world_size
    applied = vals["bad"] == 0
    if applied:
        scaler.step(optimizer)
        scaler.update()
        if parts.ema is not None:
            parts.ema.update()
    else:
        backup.restore()
        optimizer.zero_grad(set_to_none=True)
        if scaler.is_enabled():
            scaler.update()
    return StepResult(
        applied=applied,
        lr=lr,
        **{k: vals[k] / world for k in (*LOSS_KEYS, "num_pos", "grad_norm")},
        stop=vals["stop"] > 0,
    )
