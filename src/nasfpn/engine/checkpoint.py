"""Training checkpoints: everything needed to continue a run exactly, in a file that loads with
``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors, containers and plain values::

    format          "nasfpn-train"          version   CHECKPOINT_VERSION
    config          the resolved Config as a plain dict (rebuilds the model)
    model           state dict of the unwrapped model (no "module." / "_orig_mod." prefixes)
    optimizer       optimizer state dict          scaler   GradScaler state dict or None
    step            optimizer steps taken (global), the learning rate is a function of it
    epoch           epoch in progress (0-based)   iter_in_epoch   batches of it already done
    rng             python / numpy / torch / cuda generator states (lists and uint8 tensors)
    data            data-order state: seed, batch layout (order is derived from seed and epoch)
    history         one dict per finished epoch (losses, lr, COCO metrics)
    best            {"AP": ..., "epoch": ...} of the best evaluation so far
    counters        skipped (non-finite) steps, wall time so far

Files are written to a temporary name in the same folder and moved into place with
``os.replace``, so a run killed while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nasfpn.core.fileio import atomic_path
from nasfpn.core.weights import torch_load_safe

CHECKPOINT_FORMAT = "nasfpn-train"
CHECKPOINT_VERSION = 1


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# --------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """Generator states as tensors and lists (safe for ``weights_only`` loading)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": [
            str(name),
            torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------- model state


def model_is_finite(state: dict[str, torch.Tensor]) -> bool:
    """True if every floating-point tensor of a state dict is finite."""
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies with wrapper prefixes (``module.``, ``_orig_mod.``) removed."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v.detach().cpu().clone()
    return out


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write a training checkpoint atomically (``state`` as built by the trainer)."""
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint (tensors and plain values only); ``ValueError`` if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    obj = torch_load_safe(path)
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a nasfpn training checkpoint")
    if obj.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path}: checkpoint version {obj.get('version')} is not supported "
            f"(this nasfpn writes version {CHECKPOINT_VERSION})"
        )
    return obj
