"""Host-device sync points of a piece of code, found on any device (for the no-sync tests)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ATen ops that make a CUDA device wait for the host or copy a value back to it.
_SYNC_OPS = {
    "aten::nonzero",
    "aten::_local_scalar_dense",
    "aten::masked_select",
    "aten::is_nonzero",
    "aten::equal",
    "aten::unique_dim",
    "aten::_unique2",
    "aten::unique_consecutive",
    "aten::item",
}


def _has_mask(indices: Any) -> bool:
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices or ())


def find_sync_points(fn: Callable[[], Any]) -> list[str]:
    """Run ``fn`` and list the ATen calls in it that synchronise a CUDA device with the host.

    Works on any device (it inspects the ops, it does not need CUDA): ``.item()`` / ``bool(t)`` /
    ``float(t)``, ``nonzero``, boolean-mask indexing and ``masked_select``, ``unique``,
    ``repeat_interleave`` without ``output_size``. Copies to the CPU are not seen on a CPU run;
    on CUDA, ``torch.cuda.set_sync_debug_mode('error')`` is the ground truth.
    """
    found: list[str] = []

    class _Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func._schema.name
            if name in _SYNC_OPS:
                found.append(name)
            elif name == "aten::index" and _has_mask(args[1]):
                found.append(f"{name} (boolean mask)")
            elif name in ("aten::index_put", "aten::index_put_") and _has_mask(args[1]):
                # x[mask] = <one value on the host> becomes masked_fill: no sync. Anything else
                # turns the mask into indices first.
                indices = [t for t in args[1] if t is not None]
                value = args[2]
                if not (len(indices) == 1 and value.numel() == 1 and value.device.type == "cpu"):
                    found.append(f"{name} (boolean mask)")
            elif name == "aten::repeat_interleave" and kwargs.get("output_size") is None and len(args) < 4:
                found.append(name)
            return func(*args, **kwargs)

    with _Recorder():
        fn()
    return found
