"""The trainer's side of a foreground-cache rebuild (``backmix.cam_cache.rebuild``).

``--regen loop`` takes each batch's CAMs as the rebuild epoch trains (``loop_recorder``), ``--regen
pass`` decodes the data again after it (``stage_pass``). Either way every rank stages its shard, the
trainer saves the epoch's checkpoint, and only then is the generation published (``train.run_epoch``
calls the three in that order; the cache stage never calls back into the trainer).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from backmix.models import unwrap
from backmix.osr_data.open_set import OpenSetData
from backmix.osr_data.normalize import IMAGENET_MEAN, IMAGENET_STD

from .config import TrainConfig
from .resume import RunProgress
from .run_files import read_jsonl
from .run_log import show_progress

log = logging.getLogger("backmix")


def rebuild_due(cfg: TrainConfig, epoch: int) -> bool:
    """Whether epoch ``epoch`` (0-based) ends with a rebuild: every ``regen_every``, never after the last."""
    return cfg.backmix and cfg.regen_every > 0 and (epoch + 1) % cfg.regen_every == 0 and epoch + 1 < cfg.epochs


def rebuild_tag(cfg: TrainConfig, epoch: int) -> str:
    """Names the weights of a rebuild in its shards: a resume reuses only shards of the very same one."""
    return f"epoch-{epoch} {cfg.regen}"


def stage_pass(cfg: TrainConfig, model: nn.Module, data: OpenSetData, device: torch.device, *, epoch: int,
               rank: int = 0) -> int:
    """Every rank's shard of the generation rebuilt after ``epoch`` (1-based) by a separate pass over the
    current weights (rows whose shards are on disk are taken over); returns it, not yet published."""
    from backmix.cam_cache.rebuild import stage_generation
    return stage_generation(cfg.cache_dir, unwrap(model), data.train, canvas=cfg.canvas,
                            canvas_mode=cfg.canvas_mode, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                            momentum=cfg.momentum, label_map=data.label_map, rows=data.known_rows,
                            batch_size=max(cfg.batch_size, 128), num_workers=cfg.workers, device=device,
                            checkpoint_digest=rebuild_tag(cfg, epoch), progress=show_progress(cfg, rank),
                            on_error=cfg.on_error)


def loop_recorder(cfg: TrainConfig, model: nn.Module, loader, epoch: int, rank: int):
    """The in-loop rebuild of rebuild epoch ``epoch`` (1-based), started: the epoch's loop hands it every batch
    of ``loader`` (the library's ``backmix.rebuilding``, split into stage and publish here)."""
    from backmix.cam_cache.recorder import InLoopRebuild
    return InLoopRebuild(loader, model, momentum=cfg.momentum, checkpoint_digest=rebuild_tag(cfg, epoch),
                         batch_size=max(cfg.batch_size, 128), progress=show_progress(cfg, rank)).start()


def finish_pending_rebuild(cfg: TrainConfig, model: nn.Module, data: OpenSetData, device: torch.device, maps,
                           ckpt: dict, progress: RunProgress, run: Path, rank: int) -> None:
    """A resume from a rebuild epoch's checkpoint: publish the generation it records if the kill came first
    (--regen loop: the shards are all on disk, the checkpoint was saved after them; pass: any missing rows
    are computed from these weights, the ones the pass used), else keep the rebuild's logged time."""
    from backmix.cam_cache.rebuild import publish_staged
    maps.refresh()
    # Every rank decides from its node's folder, which holds rank 0's current generation (open_cache copied
    # it there), so all of them take the same branch.
    if maps.generation < ckpt["cache_generation"]:
        t0 = time.perf_counter()
        staged = stage_pass(cfg, model, data, device, epoch=progress.start, rank=rank)
        generation = publish_staged(cfg.cache_dir, staged)
        progress.history[-1].update(regen_s=time.perf_counter() - t0, regenerated=generation)
        log.info("redid the cache rebuild after epoch %d that the interrupted run left undone", progress.start)
    else:   # rebuilt before the kill: keep its logged time if the line made it to disk
        logged = {r.get("epoch"): r for r in read_jsonl(run / "metrics.jsonl")}
        if "regenerated" in logged.get(progress.start, {}):
            progress.history[-1] = logged[progress.start]
