"""Distributed training helpers: process-group setup, data sharding, collectives, SyncBN on CPU.

A run started by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) joins the ``env://``
process group: NCCL on CUDA, gloo on CPU. Everything here also works in a single process,
where the collectives return their input.

Data order is a pure function of ``(seed, epoch)``: every rank computes the same permutation of
the dataset, and global batch ``i`` of the epoch is ``order[i*B:(i+1)*B]`` with
``B = batch_size * world_size``; rank ``r`` takes the ``r``-th slice of ``batch_size`` images
of it. A single process with batch ``B`` therefore sees exactly the images that ``world_size``
processes with batch ``batch_size`` see together, and a resumed run can start at any batch.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nasfpn.core.device import parse_device
from nasfpn.data.transforms import make_generator

ORDER_STREAM = 0x6F726472
"""Third seed part of the data-order generator (sample generators use the image index there)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False
    """This call created the process group (and ``cleanup`` should destroy it)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def init_distributed(device: str | torch.device | None = None, timeout_minutes: float = 30.0) -> DistInfo:
    """Join the ``torchrun`` process group if there is one, and pick this process's device.

    ``device``: "cpu", "cuda", "cuda:N" or None (CUDA if available, else CPU). Under torchrun
    with CUDA each process takes ``cuda:LOCAL_RANK``.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = parse_device(device)  # None: CUDA if available; a missing device is a clear ValueError
    if dev.type == "cuda":
        if world > 1 or dev.index is None:
            dev = torch.device("cuda", local_rank if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    created = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            world_size=world,
            rank=rank,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
        created = True
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    return DistInfo(rank, world, local_rank, dev, created)


def cleanup(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` without a process group."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


# --------------------------------------------------------------------------- data order


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    """The permutation of ``range(num_samples)`` used in ``epoch`` (same on every rank)."""
    generator = make_generator(seed, epoch, ORDER_STREAM)
    return torch.randperm(num_samples, generator=generator).tolist()


def iters_per_epoch(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """Global batches per epoch: every image once, the last batch filled up from the start."""
    if num_samples <= 0:
        raise ValueError("the training set is empty")
    total = batch_size * world_size
    return -(-num_samples // total)


def epoch_batches(
    num_samples: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> list[list[tuple[int, int]]]:
    """This rank's batches of ``epoch`` as dataset keys ``(index, epoch)``.

    The permutation is padded by repeating it from the start until every global batch is full.
    """
    order = epoch_order(num_samples, seed, epoch)
    total = batch_size * world_size
    steps = iters_per_epoch(num_samples, batch_size, world_size)
    padded = list(order)
    while len(padded) < steps * total:
        padded.extend(order[: steps * total - len(padded)])
    out = []
    for i in range(steps):
        start = i * total + rank * batch_size
        out.append([(idx, epoch) for idx in padded[start : start + batch_size]])
    return out


class BatchList(torch.utils.data.Sampler):
    """A fixed list of batches for ``DataLoader(batch_sampler=...)``."""

    def __init__(self, batches: list[list[Any]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def shard_indices(num: int, rank: int, world_size: int) -> list[int]:
    """Evaluation sharding: rank ``r`` takes ``r, r + world, r + 2*world, ...`` (no padding)."""
    return list(range(rank, num, world_size))


# --------------------------------------------------------------------------- SyncBN on CPU


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of the output gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the whole global batch, over any backend.

    ``torch.nn.SyncBatchNorm`` runs on CUDA only; this one all-reduces the per-channel sums with a
    differentiable all-reduce, so it also works with gloo on CPU. Mean and variance are computed in two passes (mean first, then the squared
    deviations) over ``N x H x W`` of all ranks; running statistics use the unbiased variance, as
    BatchNorm does. Outside training, or without a process group, it is a plain BatchNorm.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size(self.process_group) > 1):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = torch.tensor([input.numel() // input.shape[1]], dtype=input.dtype, device=input.device)
        sums = _AllReduceSum.apply(torch.cat([input.sum(dims), count]), self.process_group)
        n = sums[-1].detach()
        mean = sums[:-1] / n
        centred = input - mean.view(shape)
        var = _AllReduceSum.apply(centred.pow(2).sum(dims), self.process_group) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            tracked, running_mean, running_var = self.num_batches_tracked, self.running_mean, self.running_var
            # BatchNorm registers these buffers whenever it tracks running statistics.
            assert tracked is not None and running_mean is not None and running_var is not None
            with torch.no_grad():
                tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(tracked)
                unbiased = var * (n / (n - 1).clamp(min=1))
                running_mean.mul_(1 - factor).add_(mean.detach().to(running_mean.dtype), alpha=factor)
                running_var.mul_(1 - factor).add_(unbiased.detach().to(running_var.dtype), alpha=factor)
        return out


def convert_sync_batchnorm(module: nn.Module, device: torch.device, process_group: Any = None) -> nn.Module:
    """Replace every BatchNorm by a synchronised one: ``torch.nn.SyncBatchNorm`` on CUDA,
    ``CPUSyncBatchNorm`` elsewhere. Parameters, buffers, train/eval mode and ``requires_grad``
    carry over."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        out = CPUSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, process_group
        )
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, device, process_group))
    return out
