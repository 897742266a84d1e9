"""Checkpoints of a run and ``--resume``: what last.pt and best.pt hold, and the run taken up again.

A checkpoint holds, besides the weights, everything the next step depends on: the optimizer, the
schedule, the loss scaler, the EMA, every RNG, the metrics so far and the best validation accuracy.
Saved at an epoch's end, or every ``--save-every`` steps inside one ("partial": each rank's loader
position, running sums and RNG), a resumed run continues from it; on the CPU the result equals the
uninterrupted run's bit for bit. A rebuild epoch's checkpoint also records the cache generation its
rebuild publishes (``regen_pending``), so a resume can finish a publish the kill cut off.

Under torchrun the BatchNorm running statistics are each rank's own (DDP sends rank 0's at every
forward, and each rank's batches move its own after), and a rank's CAMs, taken between steps, use
its own; so every checkpoint of a run of several ranks holds each rank's buffers too, which a
resume on as many ranks gives back to each.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from backmix.cam_cache.ranks import exchange
from backmix.models import unwrap
from backmix.osr_data.errors import BackMixError

from .config import TrainConfig, option
from .precision import Precision
from .recipe import Recipe
from .run_files import save_run_checkpoint

# Fields a resumed run may change; every other one must match RUN/config.json. ``data`` may move:
# the data set itself must be the run's (its fingerprint is compared).
RESUME_MAY_CHANGE = ("device", "workers", "progress", "backend", "ray_address", "prefetch", "eval_every", "save_every", "on_error", "out",
                     "data", "cache", "cache_layout", "log_every", "log", "open_test", "compile")


@dataclass
class Training:
    """The objects a step changes, all of which a checkpoint holds; ``forward``: what the training
    forward calls, the model or (--compile) its compiled form, which shares its parameters."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: Precision
    recipe: Recipe
    forward: Optional[nn.Module] = None


@dataclass
class RunProgress:
    """Where the run stands: the epochs done (their metrics lines), the best validation accuracy,
    and this rank's part of a mid-epoch checkpoint the next epoch continues from."""
    history: list = field(default_factory=list)
    best: float = -1.0
    start: int = 0
    partial: Optional[dict] = None


@dataclass(frozen=True)
class RunCheckpoints:
    """Where a run's checkpoints go and what every one of them records about the run."""
    run: Path
    cfg: TrainConfig
    num_classes: int
    known_classes: tuple
    data_fingerprint: str

    def save(self, name: str, model: nn.Module, **state) -> None:
        save_run_checkpoint(self.run / name, model, self.cfg, self.num_classes, config=self.cfg.to_dict(),
                            known_classes=list(self.known_classes), data_fingerprint=self.data_fingerprint,
                            **state)


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values (a checkpoint is loaded with ``weights_only``)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                      has_gauss, gauss], "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


def training_state(training: Training) -> dict:
    """The optimizer, schedule, loss scaler, EMA and RNG states, as a checkpoint stores them."""
    state = {"optimizer": training.optimizer.state_dict(), "scheduler": training.scheduler.state_dict(),
             "rng": rng_state(),
             "scaler": training.precision.scaler.state_dict() if training.precision.scaler else None}
    if training.recipe.ema is not None:
        state["ema_state_dict"] = training.recipe.ema.module.state_dict()
    return state


def own_buffers(model: nn.Module) -> dict:
    """This rank's buffers (BatchNorm's running statistics), as a checkpoint stores them."""
    return {name: b.detach().cpu().clone() for name, b in unwrap(model).named_buffers()}


def restore_own_buffers(model: nn.Module, buffers: Optional[dict], path: Path) -> None:
    """Give this rank back its own buffers (``own_buffers``) saved in ``path``."""
    own = dict(unwrap(model).named_buffers())
    if not isinstance(buffers, dict) or buffers.keys() != own.keys() or \
            any(not isinstance(v, torch.Tensor) or v.shape != own[k].shape for k, v in buffers.items()):
        raise BackMixError(f"{path}: a rank's saved BatchNorm statistics do not fit the model")
    with torch.no_grad():
        for name, b in own.items():
            b.copy_(buffers[name])


def save_mid_epoch(mine: dict, checkpoints: RunCheckpoints, training: Training, progress: RunProgress, *,
                   epoch: int, maps, rank: int, world: int) -> None:
    """last.pt part-way through ``epoch``: every rank's loader position, sums and RNG (``mine`` is this
    rank's, from ``train_one_epoch``) with the rest; rank 0 writes it. ``maps``: the training loader's
    foreground cache (None without BackMix), whose generation the epoch's masks come from."""
    parts = exchange({**mine, "buffers": own_buffers(training.model)} if world > 1 else mine, world)
    if rank == 0:
        checkpoints.save("last.pt", training.model, epoch=epoch, **training_state(training),
                         metrics=progress.history, best=progress.best, regen_pending=False,
                         cache_generation=maps.generation if maps is not None else 0, partial=parts)


def save_epoch_checkpoints(checkpoints: RunCheckpoints, training: Training, progress: RunProgress,
                           record: dict, *, improved: bool, regen_due: bool, rank: int, world: int = 1) -> None:
    """Rank 0 saves the end of epoch ``record["epoch"]``: best.pt first (when ``improved``: the weights
    evaluated, the EMA's with --ema), so a last.pt on disk means every best.pt up to its epoch is
    there too; then last.pt. A rebuild epoch records the generation its rebuild publishes. Every rank
    calls it (under torchrun the ranks send rank 0 their buffers first)."""
    buffers = exchange(own_buffers(training.model), world) if world > 1 else None
    if rank != 0:
        return
    state = dict(epoch=record["epoch"], **training_state(training), metrics=progress.history + [record],
                 best=progress.best, regen_pending=regen_due,
                 cache_generation=(record["cache_generation"] or 0) + int(regen_due))
    if buffers is not None:
        state["rank_buffers"] = buffers
    if improved:
        checkpoints.save("best.pt", training.recipe.eval_model(training.model), **state)
    checkpoints.save("last.pt", training.model, **state)


def resume_config(cfg: TrainConfig, explicit: set[str]) -> TrainConfig:
    """RUN/config.json, with the few fields a resumed run may change taken from ``cfg``."""
    path = cfg.run_dir / "config.json"
    if path.is_file() and not (cfg.run_dir / "last.pt").is_file():
        raise BackMixError(f"the run in {cfg.run_dir} stopped before its first checkpoint, so there is nothing "
                           "to resume: rerun it without --resume")
    if not (cfg.run_dir / "last.pt").is_file() or not path.is_file():
        raise BackMixError(f"nothing to resume in {cfg.run_dir}: it has no last.pt and config.json")
    saved = TrainConfig.load(path).to_dict()
    new = cfg.to_dict()
    changed = sorted(k for k in explicit if k in saved and new[k] != saved[k] and k not in RESUME_MAY_CHANGE)
    if changed:
        k = changed[0]
        raise BackMixError(f"--resume cannot change {option(k)} of the run in {cfg.run_dir}: it was "
                           f"{saved[k]!r}, not {new[k]!r}")
    for k in explicit:
        if k in RESUME_MAY_CHANGE:
            saved[k] = new[k]
    saved["out"] = cfg.out
    return TrainConfig.from_dict(saved)


def check_resumable(ckpt: dict, cfg: TrainConfig, known: tuple, fingerprint: str) -> None:
    """RUN/last.pt continues this run: the same known classes and data set, epochs left to train."""
    run = cfg.run_dir
    if tuple(ckpt.get("known_classes", ())) != known:
        raise BackMixError(f"{run / 'last.pt'} was trained on known classes "
                           f"{', '.join(ckpt.get('known_classes', ()))}, not {', '.join(known)}")
    if ckpt.get("data_fingerprint", fingerprint) != fingerprint:
        raise BackMixError(f"--resume cannot change --data of the run in {run}: it was trained on "
                           f"{ckpt['config']['data']}, and {cfg.data} holds another data set")
    if ckpt["epoch"] >= cfg.epochs:
        raise BackMixError(f"the run in {run} has finished all {cfg.epochs} epochs; nothing to resume")


def restore_training(training: Training, ckpt: dict, *, rank: int, world: int, path: Path) -> RunProgress:
    """Load ``ckpt``'s states into ``training`` (its model is already the checkpoint's) and return where
    the run stands; a mid-epoch checkpoint is resumed on as many ranks as saved it."""
    training.optimizer.load_state_dict(ckpt["optimizer"])
    training.scheduler.load_state_dict(ckpt["scheduler"])
    if training.precision.scaler is not None and ckpt.get("scaler"):
        training.precision.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    if training.recipe.ema is not None:
        training.recipe.ema.module.load_state_dict(ckpt["ema_state_dict"])
    progress = RunProgress(list(ckpt.get("metrics", [])), ckpt.get("best", -1.0), ckpt["epoch"])
    if ckpt.get("partial"):
        if len(ckpt["partial"]) != world:
            raise BackMixError(f"{path} was saved mid-epoch by {len(ckpt['partial'])} rank(s); "
                               f"resume it on as many, not {world}")
        progress.partial = ckpt["partial"][rank]
    if world > 1:   # each rank's own BatchNorm statistics, when saved by as many ranks (else rank 0's, as loaded)
        every = [p.get("buffers") for p in ckpt["partial"]] if ckpt.get("partial") else ckpt.get("rank_buffers") or []
        if len(every) == world and every[rank] is not None:
            restore_own_buffers(training.model, every[rank], path)
    return progress
