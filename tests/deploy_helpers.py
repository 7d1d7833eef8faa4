"""Deterministic weights and pictures for the export and serving tests.

``fill_deterministic`` sets every tensor from its name (as the MMDetection parity reference
does): LeCun-uniform convs, BN statistics drawn near 1, and a classification bias around
``cls_bias`` so that a realistic share of (anchor, class) pairs passes the 0.05 score threshold.
The detectors then give many candidates per level, overlapping boxes of one class, and NMS
that suppresses a good part of them.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nasfpn.core.presets import get_config
from nasfpn.models import build_model

TINY = "nasfpn_tiny"


def _uniform(like: torch.Tensor, g: torch.Generator, lo: float, hi: float) -> torch.Tensor:
    return (lo + (hi - lo) * torch.rand(like.shape, generator=g, dtype=torch.float64)).to(like.dtype)


def fill_deterministic(model: torch.nn.Module, seed: str = "export", cls_bias: float = -4.5) -> torch.nn.Module:
    state = model.state_dict()
    with torch.no_grad():
        for key in sorted(state):
            t = state[key]
            if not t.is_floating_point():
                continue
            g = torch.Generator().manual_seed(zlib.crc32((seed + key).encode()))
            uniform = functools.partial(_uniform, t, g)

            if key.endswith("running_mean"):
                t.copy_(uniform(-0.2, 0.2))
            elif key.endswith("running_var"):
                t.copy_(uniform(0.5, 1.5))
            elif key.endswith("weight") and t.dim() >= 2:
                bound = math.sqrt(3 / (t.numel() // t.shape[0]))
                t.copy_(uniform(-bound, bound))
            elif key.endswith("weight"):
                t.copy_(uniform(0.7, 1.1))
            elif key in ("head.retina_cls.bias", "head.retina_cls.pointwise.bias"):  # plain or separable
                t.copy_(uniform(cls_bias - 0.2, cls_bias + 0.2))
            else:
                t.copy_(uniform(-0.2, 0.2))
    return model.eval()


# The trunk the deterministic weights were calibrated on (ResNet-10's own widths and stem): the
# preset's narrower trunk gives other score ranges, and some pictures no detection at all.
TINY_TRUNK = ["model.backbone.widths=[64,128,256,512]", "model.backbone.stem=conv7"]


def tiny_config(overrides: list[str] | None = None):
    # 256 px rather than the preset's 128: thousands of NMS candidates per image.
    return get_config(TINY, ["data.image_size=256", *TINY_TRUNK, *(overrides or [])])


def tiny_model(overrides: list[str] | None = None):
    cfg = tiny_config(overrides)
    return cfg, fill_deterministic(build_model(cfg.model, pretrained_backbone=False))


def save_tiny_weights(path: Path, overrides: list[str] | None = None) -> Path:
    """Our .safetensors (weights + config) of the deterministic tiny model."""
    from nasfpn.deploy.predictor import export_weights

    cfg, model = tiny_model(overrides)
    export_weights(model, cfg, path)
    return path


def detections_by(records: list[dict], key: str, keys: Iterable = ()) -> dict[Any, dict[str, np.ndarray]]:
    """COCO-style records (``bbox`` x, y, w, h, ``score``, ``category_id``) grouped by ``key`` into
    ``boxes`` (xyxy), ``scores`` and ``labels`` (the category ids); each of ``keys`` without a record
    gets an empty entry."""
    out: dict[Any, dict[str, list]] = {k: {"boxes": [], "scores": [], "labels": []} for k in keys}
    for r in records:
        d = out.setdefault(r[key], {"boxes": [], "scores": [], "labels": []})
        x, y, w, h = r["bbox"]
        d["boxes"].append([x, y, x + w, y + h])
        d["scores"].append(r["score"])
        d["labels"].append(r["category_id"])
    return {
        k: {"boxes": np.asarray(d["boxes"], dtype=np.float64).reshape(-1, 4), "scores": np.asarray(d["scores"]),
            "labels": np.asarray(d["labels"])}
        for k, d in out.items()
    }  # fmt: skip
