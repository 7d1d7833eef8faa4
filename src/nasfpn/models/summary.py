"""Model facts: parameter counts per part, FLOPs, anchors."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from nasfpn.models.detector import RetinaNet


def count_params(module: torch.nn.Module) -> int:
    """Unique parameters (a tensor shared by several modules counts once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


@torch.no_grad()
def count_flops(model: RetinaNet, size: int) -> int:
    """FLOPs of backbone + neck + head on a ``1x3xSxS`` input (2 FLOPs per multiply-add)."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, size, size, device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())


def model_summary(model: RetinaNet, size: int) -> dict:
    flops = count_flops(model, size)
    sizes = []
    h = w = size
    for s in model.anchor_generator.strides:
        sizes.append((-(-h // s), -(-w // s)))
    per_level = [hh * ww * model.anchor_generator.num_anchors for hh, ww in sizes]
    return {
        "params_total": count_params(model),
        "params_backbone": count_params(model.backbone),
        "params_neck": count_params(model.neck),
        "params_head": count_params(model.head),
        "size": size,
        "flops": flops,
        "gflops": flops / 1e9,
        "gmacs": flops / 2e9,
        "anchors": sum(per_level),
        "anchors_per_level": per_level,
    }
