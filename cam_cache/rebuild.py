"""Finishing a cache build on every rank under torch.distributed (or alone): stage, then publish.

``stage_generation`` has every rank say which rows it holds (those fed to its
``GenerationWriter``: the in-loop CAMs; else those of its shard file of the same
build left by an interrupted run), computes the build's rows no rank holds by a
pass split k::N over the current weights, and writes every rank's shard.
``publish_staged`` then has rank 0 merge the shards and move CURRENT (where each node keeps a
cache folder of its own, ``node_folders.py`` brings the shards to rank 0 and the generation back).
``rebuild_cache`` is the two in a row.

Between the two the trainer saves its epoch checkpoint (inside ``on_every_rank``),
so the cache stage never calls back into the trainer. Resume, bitwise on the CPU:
a kill before that checkpoint (mid-epoch included) leaves generation n current and
the last checkpoint at the previous epoch: the resumed run repeats the epoch from
the same weights, RNG state and masks, so the in-loop CAMs, taken at the same
steps, are the same numbers (the repeat's writer overwrites any shard the killed
attempt left). A kill after it finds every shard on disk: ``stage_generation``
takes the shard files over and only the publish is left. The in-loop CAMs are
never recomputed from end-of-epoch weights, which would give other maps.

Errors: each step ends in a collective that every rank reaches, and an error on
any rank is raised there, as one BackMixError naming that rank, on every rank,
so no rank is left waiting on a failed one.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from backmix.osr_data.errors import BackMixError
from backmix.osr_data.index import ImageIndex

from . import precompute
from .node_folders import gather_shards, node_folders, share_current
from .precompute import GenerationWriter
from .ranks import exchange, on_every_rank, rank_and_world, rank_failure


def stage_generation(cache_dir: str | os.PathLike, model: nn.Module, index: ImageIndex, *, canvas: int,
                     mean: Sequence[float], std: Sequence[float], momentum: float = 0.1,
                     canvas_mode: str = "center", label_map: Optional[np.ndarray] = None,
                     rows: Optional[np.ndarray] = None, writer: Optional[GenerationWriter] = None,
                     batch_size: int = 128, num_workers: int = 2, device: str | torch.device = "auto",
                     checkpoint_digest: str = "", progress: bool = True, on_error: str = "raise") -> int:
    """Every rank's shard of generation n+1 on disk (see the module doc); returns n+1. With ``writer``
    (the in-loop CAMs) its own settings are the build's and the keyword arguments for one are unused.
    ``on_error`` "skip": a row whose file does not decode keeps its map (``GenerationWriter``)."""
    rank, world = rank_and_world()
    held = np.empty(0, np.int64)
    with on_every_rank(cache_dir):
        if writer is None:
            writer = GenerationWriter(cache_dir, model, index, canvas=canvas, mean=mean, std=std,
                                      momentum=momentum, label_map=label_map, rows=rows, shard=(rank, world),
                                      checkpoint_digest=checkpoint_digest, canvas_mode=canvas_mode,
                                      on_error=on_error)
        elif writer.shard != (rank, world):
            raise BackMixError(f"the writer is shard {writer.shard}, this process is rank {rank} of {world}")
        writer.take_pending()
        held = writer.done_rows
    covered = np.concatenate(exchange(held, world))
    with on_every_rank(cache_dir):
        todo = writer.rows[~np.isin(writer.rows, covered)][rank::world]
        if len(todo):
            writer.compute(todo, batch_size=batch_size, num_workers=num_workers, device=device, progress=progress)
        writer.write()
    return writer.generation


def publish_staged(cache_dir: str | os.PathLike, generation: int) -> int:
    """Rank 0 publishes the staged ``generation``; every rank returns it, or raises rank 0's error. Where
    nodes keep folders of their own (``node_folders``), the shards reach rank 0 first and the published
    generation every node's folder after."""
    rank, world = rank_and_world()
    folders = node_folders(cache_dir)
    gather_shards(cache_dir, generation, folders)
    outcome = [None]
    if rank == 0:
        try:
            outcome = [precompute.publish_generation(cache_dir, generation)]   # looked up late: tests stub it
        except Exception as e:   # noqa: BLE001
            outcome = [rank_failure(cache_dir, rank, e)]
    if world > 1:
        dist.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], str):
        raise BackMixError(outcome[0])
    share_current(cache_dir, folders)
    return int(outcome[0])


def rebuild_cache(cache_dir: str | os.PathLike, model: nn.Module, index: ImageIndex, **build) -> int:
    """Publish generation n+1: ``stage_generation`` (same arguments) then ``publish_staged``, on every
    rank under torch.distributed (or alone). Returns the published generation."""
    return publish_staged(cache_dir, stage_generation(cache_dir, model, index, **build))
