"""Which rank this process is, and how every rank meets: the collectives of the cache stage (and of the
trainer, which shares them). Alone (no process group) every one of them is a no-op on one rank."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch.distributed as dist

from backmix.osr_data.errors import BackMixError


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def exchange(value, world: int) -> list:
    """Every rank's ``value`` in rank order, on every rank (one all_gather; just [value] alone)."""
    if world == 1:
        return [value]
    everyone = [None] * world
    dist.all_gather_object(everyone, value)
    return everyone


def _raise_first(errors: list[Optional[str]]) -> None:
    first = next((e for e in errors if e), None)
    if first:
        raise BackMixError(first)


def rank_failure(cache_dir, rank: int, e: Exception) -> str:
    why = str(e) if isinstance(e, BackMixError) else f"{type(e).__name__}: {e}"
    return f"cache rebuild in {cache_dir} failed on rank {rank}: {why.splitlines()[0] if why else ''}"


@contextlib.contextmanager
def on_every_rank(cache_dir: str | os.PathLike) -> Iterator[None]:
    """Runs the block on every rank, then meets the others: an error in it on any rank is raised on
    every rank (one line naming the rank), so none waits in a later collective for a failed one."""
    rank, world = rank_and_world()
    error = None
    try:
        yield
    except Exception as e:   # noqa: BLE001 -- every failure must reach the other ranks
        error = rank_failure(cache_dir, rank, e)
    _raise_first(exchange(error, world))
