"""A run's data: the open-set split, the foreground cache and the loaders built over them."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional

import torch

from backmix.osr_data.errors import BackMixError
from backmix.osr_data.index import ImageIndex
from backmix.osr_data.open_set import OpenSetData, load_data
from backmix.osr_data.protocols import split_list
from backmix.pipeline.loaders import make_loader

from .config import TrainConfig, loader_config
from .open_test import open_test_indexes


def load_run_data(cfg: TrainConfig) -> tuple[OpenSetData, dict[str, ImageIndex]]:
    """(the data, {name: index} of the --open-test folders): every folder the run reads, checked before
    anything is written to the run folder (a refused run leaves nothing behind)."""
    # The validation rows follow the training seed: the methods of one (split, seed) pair share them.
    splits = split_list(cfg.protocol, cfg.splits_file)
    data = load_data(cfg.data, cfg.split, cfg.val_fraction, cfg.seed, splits)
    open_sets = open_test_indexes(cfg.open_test, (data.train, data.test), splits)
    if cfg.backend == "ffcv":   # every beton found, or the missing ones named in one line, before any work
        from backmix.pipeline.beton import require_image_files
        from backmix.pipeline.beton_location import require_betons, write_command
        whole = cfg.crop_from == "image"   # the training loader reads each image's file from its beton
        betons = require_betons(cfg.data, [data.train, data.test], cfg.canvas, cfg.canvas_mode, cfg.beton_mode,
                                int(cfg.jpeg_quality), whole)
        if whole:
            require_image_files(betons, write_command(cfg.data, cfg.canvas, cfg.canvas_mode, cfg.beton_mode,
                                                      int(cfg.jpeg_quality), whole) + " --force")
        for index in open_sets.values():
            require_betons(index.root, [index], cfg.canvas, cfg.canvas_mode, cfg.beton_mode, int(cfg.jpeg_quality))
    return data, open_sets


def data_fingerprint(data: OpenSetData) -> str:
    """Names the data set a run trains on: a resume must find the same one (it may have moved)."""
    return hashlib.sha256((data.train.fingerprint() + data.test.fingerprint()).encode()).hexdigest()


def open_test_loaders(cfg: TrainConfig, device: torch.device, open_sets: dict[str, ImageIndex]) -> dict:
    """The evaluation loaders of the --open-test folders (``open_test_indexes``, checked)."""
    return {name: make_loader(cfg.backend, index, loader_config(cfg, device, train=False), **cfg.loader_options())
            for name, index in open_sets.items()}


def open_cache(cfg: TrainConfig, data: OpenSetData, rank: int, world: int):
    """The foreground cache: generation 0 (0.5 everywhere, no file) unless it exists, in rank 0's folder and
    copied to each node's own (``--cache-layout``). Baselines need none."""
    if not cfg.backmix:
        return None
    from backmix.cam_cache.node_folders import open_on_every_rank
    return open_on_every_rank(cfg.cache_dir, data.train, grid=cfg.grid, canvas_mode=cfg.canvas_mode,
                              layout=cfg.cache_layout)


@dataclass
class RunLoaders:
    """The training loader (every rank its shard) and, on rank 0, the evaluation ones."""
    train: object
    test: Optional[object] = None
    val: Optional[object] = None          # the validation rows (best.pt); None when there are none
    open_sets: dict = field(default_factory=dict)   # --open-test folders

    def close(self) -> None:
        """Stop every loader's workers now: a run that ends, or is interrupted, leaves none behind."""
        for loader in (self.train, self.test, self.val, *self.open_sets.values()):
            if loader is not None:
                loader.close()


def build_loaders(cfg: TrainConfig, data: OpenSetData, device: torch.device, maps, rank: int,
                  world: int, open_sets: dict[str, ImageIndex]) -> RunLoaders:
    evaluation = loader_config(cfg, device, train=False)
    loaders = RunLoaders(make_loader(cfg.backend, data.train, loader_config(cfg, device, train=True, rank=rank,
                                                                            world=world),
                                     maps=maps, indices=data.known_rows, label_map=data.label_map,
                                     **cfg.loader_options()))
    if rank == 0:
        loaders.test = make_loader(cfg.backend, data.test, evaluation, **cfg.loader_options())
        loaders.open_sets = open_test_loaders(cfg, device, open_sets)
        if len(data.val_rows):
            loaders.val = make_loader(cfg.backend, data.train, evaluation, indices=data.val_rows,
                                      label_map=data.label_map, **cfg.loader_options())
    if len(loaders.train) == 0:
        raise BackMixError(f"{len(data.known_rows)} known training images are too few for batch size "
                           f"{cfg.batch_size} on {world} rank(s)")
    return loaders
