"""``train.deterministic``: the process-wide kernel settings of a training run, and their undoing."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch


def set_determinism(deterministic: bool, device: torch.device) -> Callable[[], None]:
    """Apply ``train.deterministic`` for a run on ``device``; returns a function restoring the
    previous global settings.

    On CUDA this selects deterministic kernels (cuDNN, cuBLAS, scatter/index ops); without it,
    cuDNN benchmarks its algorithms. CPU kernels give the same results run to run for a fixed
    thread count already, and PyTorch's deterministic mode only slows them down (about 2x on
    convolution backward), so it is not switched on there.
    """
    prev_alg = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_bench = torch.backends.cudnn.benchmark
    prev_det = torch.backends.cudnn.deterministic
    # fill_uninitialized_memory is a property of torch.utils.deterministic's module class; the
    # stubs do not declare it.
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory  # type: ignore[attr-defined]
    if deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: a few CUDA backward kernels (nearest upsampling) have no deterministic version.
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Filling every new tensor with NaN (a debugging aid of deterministic mode) costs time only.
        torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def restore() -> None:
        torch.use_deterministic_algorithms(prev_alg, warn_only=prev_warn)
        torch.backends.cudnn.benchmark = prev_bench
        torch.backends.cudnn.deterministic = prev_det
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill  # type: ignore[attr-defined]

    return restore
