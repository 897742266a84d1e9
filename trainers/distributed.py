"""torchrun / DDP: the device and rank of this process, and the few collectives the trainer uses.

Run alone, every function here is the single-process answer (rank 0 of 1), so the trainer's code
reads the same with or without torchrun.
"""
from __future__ import annotations

import hashlib
import os

import torch
import torch.distributed as dist
from torch import nn

from backmix.cam_cache.ranks import exchange
from backmix.device import choose_device


def init_distributed(request: str) -> tuple[torch.device, int, int]:
    """(device, rank, world size); joins the process group when torchrun started us."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(request, cuda_index=local)   # the one device choice of every stage
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device, rank, world


def close_distributed(world: int) -> None:
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    if world == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, world: int) -> None:
    if world > 1:
        dist.all_reduce(tensor)


def gather_weight_digests(model: nn.Module, world: int) -> list[str]:
    """sha256 of every rank's parameters (not buffers: BatchNorm running stats are per rank)."""
    h = hashlib.sha256()
    for p in unwrap(model).parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return exchange(h.hexdigest(), world)
