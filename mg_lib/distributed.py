"""torchrun / DDP set-up: rank queries, the process group, rank-0 I/O, reductions.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for one
process, so the single-process path carries no distributed code.
"""

from __future__ import annotations

import os

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


def init(device: torch.device) -> None:
    """Join the process group torchrun describes: nccl on CUDA, gloo on CPU."""
    if world_size() > 1 and not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tdist.init_process_group(backend)


def shutdown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device, sync_bn: bool) -> nn.Module:
    """DistributedDataParallel around `model` (optionally with SyncBatchNorm)."""
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def sum_tensor(t: Tensor) -> Tensor:
    """Sum a small CPU tensor over all ranks (float64 counts stay exact)."""
    if not tdist.is_initialized():
        return t
    backend_cuda = tdist.get_backend() == "nccl"
    work = t.cuda() if backend_cuda else t.clone()
    tdist.all_reduce(work)
    return work.cpu()
