"""SGD with MMDetection's parameter-wise weight decay.

The rule is mmengine's ``DefaultOptimWrapperConstructor`` with ``norm_decay_mult=0`` and
``bypass_duplicate=True``, as in the crop-640 configs:

- parameters with ``requires_grad=False`` (frozen stages) are not in the optimizer at all;
- a tensor shared by several modules (the RetinaSepBNHead tower convs) is listed once;
- weights and biases of normalisation layers (BatchNorm, SyncBatchNorm, GroupNorm, LayerNorm,
  InstanceNorm) get ``norm_weight_decay`` (0);
- every other tensor gets ``weight_decay`` (1e-4), conv biases included (``bias_decay_mult``
  is not set in those configs).

mmengine makes one param group per tensor; two groups with the same settings are the same
optimisation, so we build one group per distinct weight decay.
"""

from __future__ import annotations

import torch
from torch import nn

from nasfpn.core.config import TrainConfig

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel and/or ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(inner := getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's wrapper
            model = inner
        else:
            return model


def param_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float = 0.0) -> list[dict]:
    """Trainable parameters split by weight decay: ``[{"name", "params", "weight_decay", "param_names"}]``.

    Groups are ordered ``decay`` then ``no_decay``; empty groups are left out.
    """
    seen: set[int] = set()
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    decay_names: list[str] = []
    no_decay_names: list[str] = []
    for module_name, module in unwrap_model(model).named_modules():
        is_norm = isinstance(module, NORM_TYPES)
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{module_name}.{name}" if module_name else name
            if is_norm:
                no_decay.append(p)
                no_decay_names.append(full)
            else:
                decay.append(p)
                decay_names.append(full)
    groups = []
    if decay:
        groups.append({"name": "decay", "params": decay, "weight_decay": weight_decay, "param_names": decay_names})
    if no_decay:
        groups.append(
            {"name": "no_decay", "params": no_decay, "weight_decay": norm_weight_decay, "param_names": no_decay_names}
        )
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``param_groups``; ``lr`` is overwritten every step.

    "sgd": momentum, no dampening, no Nesterov (the recipe's). "adamw": decoupled weight decay,
    betas (0.9, 0.999), ``momentum`` unused. On CUDA the update is the fused single-kernel one.
    """
    groups = param_groups(model, cfg.weight_decay, cfg.norm_weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    device = groups[0]["params"][0].device
    if cfg.optimizer == "adamw":
        fused = torch.device(device).type == "cuda"
        return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay, fused=fused or None)
    if cfg.optimizer != "sgd":
        raise ValueError(f"train.optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")
    return make_sgd(groups, lr, cfg.momentum, cfg.weight_decay, device)


def group_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict | None:
    """The param group holding ``param`` (without its ``params`` list), or None if it is not optimised."""
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return {k: v for k, v in group.items() if k not in ("params", "param_names")}
    return None


def make_sgd(params, lr: float, momentum: float, weight_decay: float, device: torch.device | str) -> torch.optim.SGD:
    """SGD with the fused (single-kernel) update on CUDA, the default foreach update elsewhere."""
    fused = torch.device(device).type == "cuda"
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused or None)
