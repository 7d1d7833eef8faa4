"""One vocabulary of numeric precisions for every command: ``fp32``, ``bf16``, ``fp16``.

Training configs also accept ``none`` (no autocast), the older name of ``fp32``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ALIASES = {"none": "fp32", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def canonical_precision(name: str) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for any accepted spelling; ``ValueError`` otherwise."""
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in PRECISIONS:
        raise ValueError(f"precision must be one of fp32, bf16, fp16 (or none), got {name!r}")
    return key


def autocast_dtype(name: str) -> torch.dtype | None:
    """The autocast dtype of a precision, or None for fp32 (no autocast)."""
    key = canonical_precision(name)
    return None if key == "fp32" else PRECISIONS[key]


def autocast(device: torch.device | str, precision: str) -> Any:
    """``torch.autocast`` for ``bf16`` / ``fp16``; a no-op context for ``fp32``."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
