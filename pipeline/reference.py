"""The reference loader: plain ``torch.utils.data``, the result every other loader must equal.

Workers decode files to canvases; the main process mixes, crops, flips and
normalises the whole batch at once on the chosen device (``BatchTransform``).
"""
from __future__ import annotations

import logging
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from backmix.cam_cache.maps import ForegroundMaps
from backmix.osr_data.decode import DecodeError, decode_canvas
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.index import ImageIndex

from .batch import BackMixBatch, BatchTransform
from .config import LoaderConfig, choose_device, loader_inputs

log = logging.getLogger("backmix")


class CanvasDataset(Dataset):
    """dataset index -> (uint8 canvas [3, S, S], label, index); the path if it does not decode; the error
    if the file changed or went after it was indexed.

    Workers only read the index's column buffers (no per-row Python objects), so its pages stay
    shared with the main process instead of being copied into each worker."""

    def __init__(self, index: ImageIndex, canvas: int) -> None:
        self.index, self.canvas = index, canvas

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        try:
            return decode_canvas(self.index.checked_path(i), self.canvas), int(self.index.labels[i]), i
        except DecodeError as e:
            # Raised in the main process instead, so the user sees one line, not a worker traceback.
            return e.path
        except BackMixError as e:
            return e


def collate_canvases(items):
    """(canvas, labels, indices, failed): ``failed`` holds the paths that do not decode and the errors."""
    good = [it for it in items if isinstance(it, tuple)]
    failed = [it for it in items if not isinstance(it, tuple)]
    if good:
        canvas = torch.stack([g[0] for g in good])
        labels = torch.tensor([g[1] for g in good], dtype=torch.int64)
        indices = torch.tensor([g[2] for g in good], dtype=torch.int64)
    else:
        canvas, labels, indices = None, None, None
    return canvas, labels, indices, failed


class _Batches(torch.utils.data.Sampler):
    """The epoch's batches, drawn in the main process each time the DataLoader starts an epoch, so that
    ``loader.epoch`` reaches persistent workers too (they only receive indices)."""

    def __init__(self, loader: "ReferenceLoader") -> None:
        self.loader = loader

    def __iter__(self):
        ids = self.loader.dataset_indices
        return iter([ids[b].tolist() for b in self.loader.epoch_sampler.batches(self.loader.epoch)])

    def __len__(self) -> int:
        return len(self.loader.epoch_sampler)


class ReferenceLoader:
    """Yields ``BackMixBatch`` for the images ``indices`` (default: all) of ``index``."""

    backend = "reference"

    def __init__(self, index: ImageIndex, config: LoaderConfig, maps: Optional[ForegroundMaps] = None,
                 indices: Optional[np.ndarray] = None) -> None:
        self.index, self.config = index, config
        self.maps, self.dataset_indices, self.epoch_sampler = loader_inputs(index, config, maps, indices)
        self.device = choose_device(config.device)
        self.transform = BatchTransform.for_config(self.maps, config)
        self.epoch = 0
        self.skipped = 0
        self._loader = DataLoader(CanvasDataset(index, config.canvas), batch_sampler=_Batches(self),
                                  num_workers=config.num_workers, collate_fn=collate_canvases,
                                  pin_memory=self.device.type == "cuda",
                                  # Forked once, not every epoch: no re-fork cost, no fresh copies.
                                  persistent_workers=config.num_workers > 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.epoch_sampler)

    def __iter__(self) -> Iterator[BackMixBatch]:
        self.maps.refresh()   # a new cache generation takes effect at an epoch boundary
        for step, (canvas, labels, indices, failed) in enumerate(self._loader):
            for error in failed:
                if isinstance(error, BackMixError):   # a changed data set is never skipped
                    raise error
            if failed:
                if self.config.on_error == "raise":
                    raise DecodeError(failed[0])
                self.skipped += len(failed)
                for path in failed:
                    log.warning("skipped %s: it does not decode (%d skipped so far)", path, self.skipped)
            if canvas is None:
                continue
            canvas = canvas.to(self.device, non_blocking=True)
            yield self.transform(canvas, labels.to(self.device), indices.to(self.device),
                                 epoch=self.epoch, step=step, rank=self.config.rank)
