"""The library face: a BackMix stream, its cache and open-set evaluation in a few calls.

Everything here is a thin composition of the stages (``backmix.osr_data`` ->
``backmix.cam_cache`` -> ``backmix.pipeline`` -> ``backmix.trainers``); the stages stay
the place to go for finer control (``make_loader``, ``GenerationWriter``, ``TrainConfig``).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from .arguments import (check_eval_loader, check_loader_model, check_model, check_root, check_split,
                        check_val_fraction)
from .cam_cache import ForegroundCache, rebuild_cache
from .cam_cache.ranks import launched_as
from .cam_cache.recorder import InLoopRebuild
from .pipeline import LoaderConfig, make_loader
from .pipeline.loaders import backend_options
from .pipeline.sampling import check_seed
from .models.zoo import unwrap
from .osr_data.normalize import IMAGENET_MEAN, IMAGENET_STD
from .osr_data.protocols import split_list
from .osr_data.open_set import OpenSetData, load_data
from .trainers.epoch import evaluate as _evaluate, predict
from .trainers.selection import validation_metrics
from .trainers.precision import Precision


def open_set_data(root: str | os.PathLike, split: str | int = "0", *, val_fraction: float = 0.0,
                  seed: int = 0, protocol: Optional[str] = None, splits_file: Optional[str] = None) -> OpenSetData:
    """A prepared folder (``root/train``, ``root/test``) and its open-set split: a split number
    ("0".."4") or a comma list of known class names. ``num_known`` is the classifier's class count.
    ``val_fraction``: that share of each known class's training images (chosen by ``seed``, as
    ``backmix train --val-fraction`` does with its ``--seed``) becomes ``val_rows``, left out of
    ``known_rows`` (what a training loader serves); select checkpoints on it, never on the test folder.
    ``protocol`` ("cifar10", "cifar+10", "cifar+50", "tinyimagenet") or ``splits_file`` (JSON): ``split`` is
    a number into that list of published splits (``backmix.osr_data.protocols``); the Semantic Shift
    Benchmark's ("ssb-imagenet", "ssb-cub", "ssb-aircraft", "ssb-scars") have one split, ``"all"``."""
    check_root(root)
    return load_data(root, check_split(split), check_val_fraction(val_fraction), check_seed(seed),
                     split_list(protocol, splits_file))


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    rank, world, _ = launched_as()
    return rank, world


def loader(data: OpenSetData | str | os.PathLike, *, split: str | int | None = None,
           cache: Optional[str | os.PathLike] = None, backend: str = "reference", train: bool = True,
           validation: bool = False, **options):
    """The BackMix stream of ``data``'s known training classes (``train=True``) or its whole test
    folder for evaluation (``train=False``; with ``validation=True`` the validation rows of the training
    folder instead, as evaluated: select checkpoints on these), from the loader ``backend`` ("reference",
    "torchvision", "dali", "ffcv", "ray"). ``data``: an ``OpenSetData``, or a prepared folder with
    ``split`` (default "0"; an OpenSetData has its split already).

    ``beton_mode`` ("raw", the default: the reference stream bit for bit; or "jpg" with ``jpeg_quality``)
    picks the ffcv backend's beton; ``beton=FILE`` names one.
    ``cache``: the foreground-cache folder a training loader reads its maps from (created at
    generation 0 when absent; rebuild it with ``backmix.rebuild``); without one the maps stay at
    generation 0. ``options`` are ``LoaderConfig`` fields (batch_size, canvas, crop, device, ...).
    Under torch.distributed (torchrun) a training loader serves this rank's shard. Batches carry
    closed-set labels 0..K-1 (-1 marks an unknown class in an evaluation loader); ``batch.inputs()``
    gives (x, y) for one forward pass.
    """
    if isinstance(data, OpenSetData):
        if split is not None:   # data holds its split already: another one here would be ignored
            raise TypeError(f"split={split!r} goes with a folder path; data is an OpenSetData, whose split "
                            f"is fixed (make it with backmix.open_set_data(root, split))")
    else:
        data = open_set_data(data, "0" if split is None else split)
    extra = backend_options(backend, **{k: options.pop(k, None) for k in
                                        ("ray_address", "prefetch", "beton_mode", "jpeg_quality")})
    beton = options.pop("beton", None)      # ffcv: a beton file of the split's folder
    if beton is not None:
        extra["beton"] = beton
    rank, world = _dist() if train else (0, 1)
    options.setdefault("backmix", train)
    # last_batch "keep" (the default) under DDP too: every image once an epoch, the same number of steps on
    # every rank; "drop": only full batches, the same number on every rank (what timm's Mixup needs)
    options.setdefault("last_batch", "keep")
    if not train and options["last_batch"] != "keep":
        raise ValueError("last_batch='drop' is for training loaders: an evaluation loader serves every image")
    config = LoaderConfig(train=train, shuffle=train, rank=rank, world_size=world, **options)
    maps = None
    if cache is not None and train and config.backmix:   # each node's own folder, or one they share
        from .cam_cache.node_folders import open_on_every_rank
        maps = open_on_every_rank(cache, data.train, grid=config.grid, canvas_mode=config.canvas_mode)
    if train and validation:
        raise ValueError("validation=True is an evaluation loader: pass train=False")
    index, rows = (data.train, data.known_rows) if train else (data.train, data.val_rows) if validation \
        else (data.test, None)
    return make_loader(backend, index, config, maps=maps, indices=rows, label_map=data.label_map, **extra)


def rebuild(train_loader, model: nn.Module, *, momentum: float = 0.1, progress: bool = True) -> int:
    """The next cache generation from ``model``'s current weights, for the rows ``train_loader``
    serves, by a pass over their canvases; the loader uses it from its next epoch. Under
    torch.distributed call it on every rank: each builds its shard, rank 0 publishes, and an error
    on any rank is raised on every rank. Returns the published generation."""
    check_loader_model(train_loader, model)
    maps = train_loader.maps
    if not isinstance(maps, ForegroundCache):
        raise TypeError("rebuild needs a loader made with a cache folder: backmix.loader(..., cache=DIR)")
    cfg = train_loader.config
    net = unwrap(model)
    was_training = net.training
    try:
        return rebuild_cache(maps.cache_dir, net.eval(), train_loader.index, canvas=cfg.canvas,
                             canvas_mode=cfg.canvas_mode, mean=cfg.mean,
                             std=cfg.std, momentum=momentum, label_map=train_loader.row_labels.label_map,
                             rows=train_loader.dataset_indices,   # every rank's loader lists all rows
                             num_workers=cfg.num_workers, device=next(net.parameters()).device,
                             progress=progress, on_error=cfg.on_error)
    finally:
        net.train(was_training)


def rebuilding(loader, model: nn.Module, *, momentum: float = 0.1, enabled: bool = True,
               progress: bool = False) -> InLoopRebuild:
    """``with rebuilding(train_loader, model) as rebuild:`` around an epoch's loop, which calls
    ``rebuild.record(batch)`` with each batch before its step: the CAMs of each batch as it is trained on, published as the cache's next generation when the block ends (on every rank under
    torch.distributed: each stages its shard, rank 0 publishes, an error on any rank is raised on
    all). ``enabled=False`` does nothing (e.g. no rebuild after the last epoch). Each ``with`` block
    of the same object publishes the next generation. ``model`` is checked as ``rebuild`` checks it."""
    check_loader_model(loader, model)
    return InLoopRebuild(loader, model, momentum=momentum, enabled=enabled, progress=progress)


def evaluate(model: nn.Module, test_loader, data: OpenSetData) -> dict:
    """Closed-set accuracy on the known test classes; AUROC, FPR at 95 % TPR and OSCR of known vs
    unknown test images, scored by maximum softmax probability (``*_msp``) and maximum logit (``*_mls``).
    Given the validation loader (``backmix.loader(data, train=False, validation=True)``, known classes
    only): its closed-set accuracy and cross-entropy, what selects a checkpoint."""
    check_model(model, data.num_known)
    validation = check_eval_loader(test_loader, data)
    precision = Precision(next(model.parameters()).device, "auto")
    if validation:
        return validation_metrics(*predict(model, test_loader, precision), data.label_map)
    return _evaluate(model, test_loader, data.label_map, precision)


__all__ = ["evaluate", "loader", "open_set_data", "rebuild", "rebuilding", "IMAGENET_MEAN", "IMAGENET_STD"]
