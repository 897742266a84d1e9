"""The reference loader: plain ``torch.utils.data``, the result every other loader must equal.

Workers decode files to canvases; the main process mixes, crops, flips and
normalises the whole batch at once on the chosen device (``BatchTransform``).
"""
from __future__ import annotations

import logging
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from backmix.cam_cache.maps import ForegroundMaps
from backmix.osr_data.decode import DecodeError, decode_canvas
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.index import ImageIndex

from .batch import BackMixBatch, BatchTransform, to_device
from .config import LoaderConfig, LoaderPosition, choose_device, loader_inputs

log = logging.getLogger("backmix")


class CanvasDataset(Dataset):
    """dataset index -> (uint8 canvas [3, S, S], label, index); the path if it does not decode; the error
    if the file changed or went after it was indexed.

    Workers only read the index's column buffers (no per-row Python objects), so its pages stay
    shared with the main process instead of being copied into each worker."""

    def __init__(self, index: ImageIndex, canvas: int, mode: str) -> None:
        self.index, self.canvas, self.mode = index, canvas, mode

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        try:
            return self.pixels(self.index.checked_path(i)), int(self.index.labels[i]), i
        except DecodeError as e:
            # Raised in the main process instead, so the user sees one line, not a worker traceback.
            return e.path
        except BackMixError as e:
            return e

    def pixels(self, path: str):
        """What a worker hands on for one file: here its canvas."""
        return decode_canvas(path, self.canvas, self.mode)


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
    """The batches of the iteration being started (the epoch's, from the resume step on). Drawn in the
    main process each time the DataLoader starts an iteration, so persistent workers get them too
    (they only receive indices)."""

    def __init__(self, loader: "ReferenceLoader") -> None:
        self.loader = loader

    def __iter__(self):
        return iter([rows.tolist() for _, rows in self.loader.plan])

    def __len__(self) -> int:
        return len(self.loader.plan)


class ReferenceLoader(LoaderPosition):
    """Yields ``BackMixBatch`` for the images ``indices`` (default: all) of ``index``; ``label_map``
    (dataset label -> 0..K-1) gives the batches closed-set labels."""

    backend = "reference"

    def __init__(self, index: ImageIndex, config: LoaderConfig, maps: Optional[ForegroundMaps] = None,
                 indices: Optional[np.ndarray] = None, label_map: Optional[np.ndarray] = None) -> None:
        self.index, self.config = index, config
        self.maps, self.dataset_indices, self.epoch_sampler, self.row_labels = loader_inputs(
            index, config, maps, indices, label_map)
        self.device = choose_device(config.device)
        self.transform = BatchTransform.for_config(self.maps, config)
        self._start_position()
        self.plan: list[tuple[int, np.ndarray]] = []
        self._setup_decoding()

    def _setup_decoding(self) -> None:
        """What turns a batch's rows into canvases: DataLoader workers running ``CanvasDataset`` and
        ``collate_canvases`` (the Ray backend runs the same two in Ray tasks)."""
        config = self.config
        self._loader = self._data_loader(CanvasDataset(self.index, config.canvas, config.canvas_mode), collate_canvases,
                                         pin_memory=self.device.type == "cuda")

    def _data_loader(self, dataset: Dataset, collate, pin_memory: bool) -> DataLoader:
        """The DataLoader whose workers run ``dataset`` over this iteration's batches."""
        config = self.config
        return DataLoader(dataset, batch_sampler=_Batches(self), num_workers=config.num_workers, collate_fn=collate,
                          pin_memory=pin_memory,
                          # Forked once, not every epoch: no re-fork cost, no fresh copies.
                          persistent_workers=config.num_workers > 0,
                          # Its own generator: starting an epoch draws a worker seed from it,
                          # which must not move the trainer's (dropout's) global RNG.
                          generator=torch.Generator().manual_seed(config.seed))

    def close(self) -> None:
        """Stop the persistent workers now. A loader left to the garbage collector may still be
        uncollected when the next loader forks its workers; a forked child that then collects the
        inherited iterator asserts "can only test a child process". Shut down here, the copy a child
        inherits is marked shut down and its finaliser does nothing."""
        loader = getattr(self, "_loader", None)   # the Ray backend decodes in Ray tasks instead
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()
            loader._iterator = None

    def _canvas_batches(self) -> Iterable:
        """This epoch's ``collate_canvases`` results, one per step, in order."""
        return self._loader

    def __iter__(self) -> Iterator[BackMixBatch]:
        self.maps.refresh()   # a new cache generation takes effect at an epoch boundary
        self.plan = self.epoch_plan()
        for (step, _), (canvas, _, indices, failed) in zip(self.plan, self._canvas_batches()):
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
            rows = indices.numpy()
            canvas = to_device(canvas, self.device)
            images, mixed = self.transform(canvas, rows, epoch=self.epoch, step=step, rank=self.config.rank)
            self.next_step = step + 1
            yield self.deliver(BackMixBatch(canvas, images, mixed, *self.row_labels.take(rows, self.device)))
        self.next_step = len(self)
