"""The reference backend: plain ``torch.utils.data``, the stream every other backend must equal.

``DataLoader`` workers read each file to a canvas (``read_canvas``); the loader core mixes,
crops, flips and normalises the whole batch at once on the chosen device (``BatchTransform``).
``WorkerSource`` is also the base of any backend that only decodes: override ``decode`` (one
file -> uint8 canvas); or ``dataset``, ``collate`` and ``canvases_of`` to hand the loading process
something else (the torchvision backend hands JPEG bytes and decodes them on the device).
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from backmix.osr_data.canvas_reads import CanvasDataset, collate_canvases, collate_photos, decode_canvas_and_image
from backmix.osr_data.decode import decode_canvas

from .core import Loader, Plan, Source, SourceBatch, canvases_fit


class BatchKey(list):
    """A batch's rows as the DataLoader hands them to a worker, with what the worker needs to transform
    the batch itself: the epoch, the step, the rows' soft maps (gathered in the loading process, so
    a worker never holds a stale cache generation) and whether to hand the canvas back too."""

    def __init__(self, rows: list, epoch: int, step: int, maps, keep_canvas: bool) -> None:
        super().__init__(rows)
        self.epoch, self.step, self.maps, self.keep_canvas = epoch, step, maps, keep_canvas

    def __reduce__(self):
        return BatchKey, (list(self), self.epoch, self.step, self.maps, self.keep_canvas)


class TransformedBatch(NamedTuple):
    """A batch a worker transformed (mixed, cropped, flipped, normalised): ``collate_canvases``'s fields
    and the transform's."""
    canvas: Optional[torch.Tensor]
    rows: torch.Tensor
    failed: list
    images: Optional[torch.Tensor]
    mixed: Optional[torch.Tensor]


class TransformingDataset(CanvasDataset):
    """``CanvasDataset`` that, given a ``BatchKey`` and a ``transform`` (``BatchTransform``), also transforms
    the batch in the worker (``TransformedBatch``); other keys get the canvases, as ``CanvasDataset``'s."""

    def __init__(self, index, canvas: int, mode: str, decode=None, transform=None, rank: int = 0,
                 whole: bool = False) -> None:
        super().__init__(index, canvas, mode, decode, whole)
        self.transform, self.rank = transform, rank

    def __getitems__(self, key: list):
        items = [self[row] for row in key]
        if not isinstance(key, BatchKey) or self.transform is None:
            return items
        canvas, rows, failed = collate_canvases(items)
        if canvas is None:
            return TransformedBatch(None, rows, failed, None, None)
        if not canvases_fit(canvas, len(rows), self.canvas):
            return items   # untransformed: the loading process refuses them in one line (``Loader.check_canvas``)
        maps = None
        if key.maps is not None:   # the soft maps of the rows that decoded
            maps = key.maps[[k for k, it in enumerate(items) if isinstance(it, tuple)]]
        images, mixed = self.transform(canvas, rows.numpy(), epoch=key.epoch, step=key.step, rank=self.rank, maps=maps,
                                       photos=collate_photos(items))
        return TransformedBatch(canvas if key.keep_canvas else None, rows, failed, images, mixed)


def collate_or_pass(items):
    """The DataLoader's collate: ``collate_canvases`` and ``collate_photos``; a batch the worker transformed
    passes as it is."""
    return items if isinstance(items, TransformedBatch) else (*collate_canvases(items), collate_photos(items))


class _Batches(torch.utils.data.Sampler):
    """The batches of the iteration being started (the plan). Drawn in the main process each time the
    DataLoader starts an iteration, so persistent workers get them too (they only receive rows)."""

    def __init__(self, source: "WorkerSource") -> None:
        self.source = source

    def __iter__(self):
        # A generator: the DataLoader draws each batch's key just before it sends it to a worker.
        source, view = self.source, self.source.view
        for step, rows in source.plan:
            if not source.transform_in_workers:
                yield rows.tolist()
                continue
            maps = view.maps_of(rows) if source.config.backmix else None
            yield BatchKey(rows.tolist(), view.epoch, step, maps, view.wants_canvas)

    def __len__(self) -> int:
        return len(self.source.plan)


class WorkerSource(Source):
    """Decodes in ``config.num_workers`` DataLoader workers (0: in the loading process)."""

    name = "reference"
    whole_images_refused = None   # crops cut from the image: its workers read the whole image too
    pin_memory = True    # canvases bound for a GPU come from pinned memory
    workers_transform = True   # on the CPU, the workers also mix, crop and normalise (``transform_in_workers``)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # A backend with its own decode but the inherited whole-image read would cut crops from pixels
        # its decode never made: it refuses crops cut from the image until it reads the image itself.
        if "decode" in vars(cls) and "decode_whole" not in vars(cls) and "whole_images_refused" not in vars(cls):
            cls.whole_images_refused = "its decode makes canvases only (it has no decode_whole)"

    @property
    def transform_in_workers(self) -> bool:
        """On a CPU device with workers, each worker transforms its batch (mix, crop, flip, normalise: a
        pure function of (seed, epoch, rank, step) and the rows' maps) in parallel with the others,
        instead of the loading process doing every batch's in turn; on a GPU the device does it."""
        cfg = self.config
        # (the two-view baseline's second crop of whole images is cut where the batch is delivered)
        return (self.workers_transform and cfg.num_workers > 0 and self.device.type == "cpu"
                and not (cfg.crops_images and cfg.views == 2))

    def decode(self, path: str, size: int, mode: str) -> torch.Tensor:
        """One file -> uint8 [3, size, size]: the canvas (raises ``DecodeError`` when it does not decode)."""
        return decode_canvas(path, size, mode)

    def decode_whole(self, path: str, size: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One file -> (canvas, the whole image uint8 [3, H, W]): the read when crops are cut from the
        image (``LoaderConfig.crops_images``)."""
        return decode_canvas_and_image(path, size, mode)

    def dataset(self) -> Dataset:
        """What the workers run per row (``CanvasDataset`` over ``decode``, or ``decode_whole``)."""
        cfg = self.config
        transform = self.view.transform if self.transform_in_workers else None
        decode = self.decode_whole if cfg.crops_images else self.decode
        return TransformingDataset(self.index, cfg.canvas, cfg.canvas_mode, decode, transform, cfg.rank,
                                whole=cfg.crops_images)

    collate = staticmethod(collate_or_pass)   # runs in the worker

    def canvases_of(self, batch) -> tuple:
        """In the loading process: ``collate``'s output -> (canvas, rows, failed, photos or None)."""
        return batch

    def open(self, rows, view) -> None:
        super().open(rows, view)
        cfg = self.config
        self.plan: Plan = []
        self._loader = DataLoader(
            self.dataset(), batch_sampler=_Batches(self), num_workers=cfg.num_workers, collate_fn=self.collate,
            pin_memory=self.pin_memory and self.device.type == "cuda",
            # Forked once, not every epoch: no re-fork cost, no fresh copies.
            persistent_workers=cfg.num_workers > 0,
            # Its own generator: starting an epoch draws a worker seed from it, which must not move
            # the trainer's (dropout's) global RNG.
            generator=torch.Generator().manual_seed(cfg.seed))

    def batches(self, plan: Plan) -> Iterator[SourceBatch]:
        self.plan = plan
        for (step, _), batch in zip(plan, self._loader):
            if isinstance(batch, TransformedBatch):
                yield SourceBatch(step, batch.rows.numpy(), batch.canvas, batch.failed, batch.images, batch.mixed)
                continue
            canvas, rows, failed, *photos = self.canvases_of(batch)   # a backend's own may give no photos
            yield SourceBatch(step, rows.numpy(), canvas, failed, photos=photos[0] if photos else None)

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
