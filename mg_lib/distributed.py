"""torchrun / DDP set-up: rank queries, the process group, rank-0 I/O, reductions, SyncBN.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for one
process, so the single-process path carries no distributed code.

Under torchrun every rank builds the same seeded model and walks the same data order; the
Loader hands rank r the r-th contiguous share of each global batch (DistributedSampler's job),
DDP averages gradients, and only rank 0 writes files or prints. Anything that decides
control flow (a NaN loss, a signal) is agreed on by all ranks, so no rank is left waiting in a
collective that the others have abandoned.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor, nn


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    """True inside a process group of more than one rank."""
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def init(device: torch.device) -> None:
    """Join the process group torchrun describes: nccl on CUDA, gloo on CPU."""
    if world_size() > 1 and not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tdist.init_process_group(backend)


@contextmanager
def session(device: torch.device) -> Iterator[None]:
    """The process group of one command under torchrun (nothing without it)."""
    init(device)
    try:
        yield
    finally:
        shutdown()


def shutdown() -> None:
    """Leave the process group (a no-op outside one).

    Garbage is collected first, so that nothing left in a reference cycle (a DDP wrapper, its
    reducer) still holds the group: gloo threads that outlive destroy_process_group can abort
    the process at interpreter exit (seen once in CI as SIGABRT in a spawned rank).
    """
    if tdist.is_initialized():
        gc.collect()
        tdist.destroy_process_group()
        gc.collect()


def barrier() -> None:
    """Wait for every rank. Call it only where every rank is bound to arrive."""
    if active():
        tdist.barrier()


def _comm_device() -> torch.device:
    # nccl only moves CUDA tensors; gloo is happy with CPU ones.
    return torch.device("cuda", torch.cuda.current_device()) \
        if tdist.get_backend() == "nccl" else torch.device("cpu")


def sum_tensor(t: Tensor) -> Tensor:
    """Sum a small CPU tensor over all ranks (float64 counts stay exact)."""
    if not active():
        return t
    work = t.to(_comm_device(), copy=True)
    tdist.all_reduce(work)
    return work.cpu()


def any_true(*flags: bool) -> tuple[bool, ...]:
    """Each flag OR-ed over all ranks: one tiny all-reduce, so every rank takes the same branch."""
    if not active():
        return tuple(bool(f) for f in flags)
    t = torch.tensor([float(f) for f in flags], device=_comm_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


@torch.no_grad()
def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BN running statistics).

    Without SyncBN each rank's last forward updates its running stats from its own share of
    the batch; DDP overwrites them from rank 0 at the next forward anyway. Doing it at epoch
    end makes every rank hold exactly the checkpoint rank 0 writes, so a sharded evaluation
    equals a single-process evaluation of that file.
    """
    if active():
        for b in model.buffers():
            tdist.broadcast(b, src=0)


# ------------------------------------------------------------------ SyncBN


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient of a sum over ranks is the sum of the
    ranks' gradients, so the backward pass all-reduces too."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        t = t.clone(memory_format=torch.contiguous_format)
        tdist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        tdist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics span the whole global batch, on any backend.

    torch's nn.SyncBatchNorm runs only on CUDA-like devices; this one is for CPU (gloo).
    The statistics go through a differentiable all-reduce, so the backward pass sums each
    rank's contribution too: with equal shares, one DDP step equals one single-process step
    on the global batch. Same parameters and buffers as nn.BatchNorm2d, so checkpoint keys
    do not change.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and active()):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        dims, c = (0, 2, 3), x.shape[1]
        count = torch.full((1,), x.numel() // c, dtype=x.dtype, device=x.device)
        s = all_reduce(torch.cat([x.sum(dims), count]))
        n = s[-1]
        mean = s[:-1] / n
        # Two passes (mean, then squared deviations) as F.batch_norm, not E[x^2] - E[x]^2.
        var = all_reduce(((x - mean.view(1, c, 1, 1)) ** 2).sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                     else self.momentum)
                self.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
                unbiased = var.detach() * (n / (n - 1).clamp(min=1))
                self.running_var.mul_(1 - f).add_(unbiased, alpha=f)
        y = (x - mean.view(1, c, 1, 1)) * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y


def _to_global_bn(module: nn.Module) -> None:
    """Swap every nn.BatchNorm2d below `module` for a GlobalBatchNorm2d sharing its tensors."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum,
                                    child.affine, child.track_running_stats)
            # The same Parameter objects: an optimiser built before the swap still owns them.
            new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(module, name, new)
        else:
            _to_global_bn(child)


def convert_sync_bn(model: nn.Module, device: torch.device) -> nn.Module:
    """SyncBatchNorm in place (same parameters, same state_dict keys)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    _to_global_bn(model)
    return model


def wrap(model: nn.Module, device: torch.device, sync_bn: bool) -> nn.Module:
    """DistributedDataParallel around `model` (optionally with SyncBatchNorm).

    Every parameter of an mg net gets a gradient on every step (tests/test_ddp.py checks it),
    so find_unused_parameters stays off and DDP need not walk the graph each step.
    """
    if sync_bn:
        model = convert_sync_bn(model, device)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)
