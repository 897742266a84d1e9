"""The reference backend: plain ``torch.utils.data``, the stream every other backend must equal.

``DataLoader`` workers read each file to a canvas (``read_canvas``); the loader core mixes,
crops, flips and normalises the whole batch at once on the chosen device (``BatchTransform``).
``WorkerSource`` is also the base of any backend that only decodes: override ``decode`` (one
file -> uint8 canvas); or ``dataset``, ``collate`` and ``finish`` to hand the loading process
something else (the torchvision backend hands JPEG bytes and decodes them on the device).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from backmix.osr_data.canvas_reads import CanvasDataset, collate_canvases
from backmix.osr_data.decode import decode_canvas

from .core import Loader, Plan, Source, SourceBatch


class _Batches(torch.utils.data.Sampler):
    """The batches of the iteration being started (the plan). Drawn in the main process each time the
    DataLoader starts an iteration, so persistent workers get them too (they only receive rows)."""

    def __init__(self, source: "WorkerSource") -> None:
        self.source = source

    def __iter__(self):
        return iter([rows.tolist() for _, rows in self.source.plan])

    def __len__(self) -> int:
        return len(self.source.plan)


class WorkerSource(Source):
    """Decodes in ``config.num_workers`` DataLoader workers (0: in the loading process)."""

    name = "reference"
    pin_memory = True    # canvases bound for a GPU come from pinned memory

    def decode(self, path: str, size: int, mode: str) -> torch.Tensor:
        """One file -> uint8 [3, size, size]: the canvas (raises ``DecodeError`` when it does not decode)."""
        return decode_canvas(path, size, mode)

    def dataset(self) -> Dataset:
        """What the workers run per row (``CanvasDataset`` over ``decode``)."""
        cfg = self.loader.config
        return CanvasDataset(self.loader.index, cfg.canvas, cfg.canvas_mode, self.decode)

    collate = staticmethod(collate_canvases)   # runs in the worker

    def finish(self, batch) -> tuple:
        """In the loading process: ``collate``'s output -> (canvas, rows, failed)."""
        return batch

    def open(self) -> None:
        cfg = self.loader.config
        self.plan: Plan = []
        self._loader = DataLoader(
            self.dataset(), batch_sampler=_Batches(self), num_workers=cfg.num_workers, collate_fn=self.collate,
            pin_memory=self.pin_memory and self.loader.device.type == "cuda",
            # Forked once, not every epoch: no re-fork cost, no fresh copies.
            persistent_workers=cfg.num_workers > 0,
            # Its own generator: starting an epoch draws a worker seed from it, which must not move
            # the trainer's (dropout's) global RNG.
            generator=torch.Generator().manual_seed(cfg.seed))

    def batches(self, plan: Plan) -> Iterator[SourceBatch]:
        self.plan = plan
        for (step, _), batch in zip(plan, self._loader):
            canvas, rows, failed = self.finish(batch)
            yield SourceBatch(step, rows.numpy(), canvas, failed)

    def close(self) -> None:
        # Shut down here, the copy a forked child inherits is marked shut down and does nothing.
        iterator = getattr(self._loader, "_iterator", None) if hasattr(self, "_loader") else None
        if iterator is not None:
            iterator._shutdown_workers()
            self._loader._iterator = None


class ReferenceLoader(Loader):
    """The reference backend's loader: ``Loader(WorkerSource, ...)``, arguments as ``Loader``'s."""

    def __init__(self, index, config, maps=None, indices=None, label_map=None) -> None:
        super().__init__(WorkerSource, index, config, maps, indices, label_map)
