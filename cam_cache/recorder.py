"""The in-loop rebuild for any training loop: ``with backmix.rebuilding(train_loader, model) as rebuild:``
(``backmix/api.py``, which checks the model first, makes an ``InLoopRebuild``).

While the block runs, the loader's batches carry their canvases (``Loader.keep_canvases``) and the loop
hands each batch it trains on to ``rebuild.record(batch)`` before its step, which takes the CAMs of the
batch's un-augmented canvases with the model's weights of that moment, i.e. those of the step that
trains on the batch. The loader knows nothing of the recorder: it only keeps the canvases. No image is
decoded a second time, no RNG is drawn, and the model's train/eval mode is kept. When the
block ends without an error, every rank stages its shard and rank 0 publishes
(``cam_cache/rebuild.py``); the loader uses the new maps from its next epoch. Rows
no rank saw in the block (a loop resumed mid-epoch) are computed there by a pass
over the current weights, so the generation always covers every row once.

``backmix train --regen loop`` uses this same recorder, splitting the end in two:
``stage()``, its checkpoint, ``publish()``; its mid-epoch checkpoints keep the rows
recorded so far beside last.pt (``save_rows``, ``load_rows``: a file in the shard
format), since the CAMs of past steps cannot be taken again after a resume. Under DDP a loader that repeats a
sample to give every rank the same number of steps (``EpochSampler``) gets that
sample's CAM once, from its first step.
"""
from __future__ import annotations

import logging
import weakref
from typing import Optional

import numpy as np
from torch import nn

from backmix.models import unwrap
from backmix.osr_data.errors import BackMixError

from .generation_file import MappedMaps, write_maps
from .precompute import GenerationWriter
from .ranks import rank_and_world
from .rebuild import publish_staged, stage_generation
from .store import ForegroundCache

log = logging.getLogger("backmix")

# The loaders an in-loop rebuild records from now, here rather than on the loader (which knows only that
# its canvases are kept): two rebuilds of one loader's epoch would each publish a generation.
_RECORDING: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class InLoopRebuild:
    """Records the CAMs of the batches of ``loader`` that the loop hands to ``record`` while started;
    ``stage`` + ``publish`` (or the end of a ``with`` block) make them the cache's next generation.

    enabled False: a no-op (a loop can write ``with rebuilding(..., enabled=epoch + 1 < epochs)``).
    checkpoint_digest names the weights in the shard files (a resume reuses only shards of the same
    build); default: the loader's epoch. The rows are the loader's (every rank lists all of them). The
loader's ``on_error`` is the pass's: under "skip" a row it skipped keeps its map.
    """

    def __init__(self, loader, model: nn.Module, *, momentum: float = 0.1, enabled: bool = True,
                 checkpoint_digest: Optional[str] = None, batch_size: int = 128, progress: bool = False) -> None:
        maps = getattr(loader, "maps", None)
        if enabled and not isinstance(maps, ForegroundCache):
            raise BackMixError("an in-loop rebuild needs a loader made with a cache folder: "
                               "backmix.loader(..., cache=DIR)")
        self.loader, self.model, self.enabled = loader, unwrap(model), enabled
        self.momentum, self.batch_size, self.progress = momentum, batch_size, progress
        self.checkpoint_digest = checkpoint_digest
        self.writer: Optional[GenerationWriter] = None
        self.staged: Optional[int] = None
        self.generation: Optional[int] = None     # what ``publish`` made current
        self._recording = False
        self._recorded = 0                        # batches handed to ``record`` and rows taken back since ``start``
        self._canvases_before = False             # whether the loader kept its canvases before ``start``

    @property
    def cam_seconds(self) -> float:
        """Seconds spent taking CAMs inside the loop (the in-loop rebuild's cost to the epoch)."""
        return self.writer.cam_seconds if self.writer is not None else 0.0

    def start(self) -> "InLoopRebuild":
        """Records a new generation: each ``with`` block of one object publishes its own (the next)."""
        if not self.enabled:
            return self
        if self.loader in _RECORDING:
            raise BackMixError("the loader already records an in-loop rebuild")
        self.staged = self.generation = None
        cfg, maps = self.loader.config, self.loader.maps
        digest = self.checkpoint_digest if self.checkpoint_digest is not None else f"in-loop epoch {self.loader.epoch}"
        self.writer = GenerationWriter(maps.cache_dir, self.model, self.loader.index, canvas=cfg.canvas,
                                       mean=cfg.mean, std=cfg.std, momentum=self.momentum,
                                       label_map=self.loader.row_labels.label_map, rows=self.loader.dataset_indices,
                                       shard=rank_and_world(), checkpoint_digest=digest,
                                       canvas_mode=cfg.canvas_mode, on_error=cfg.on_error)
        _RECORDING[self.loader] = self
        self._canvases_before = self.loader.carries_canvas
        self.loader.keep_canvases(True)
        self._recording, self._recorded = True, 0
        return self

    def record(self, batch) -> None:
        """The CAMs of ``batch``'s canvases with the current weights: the loop calls it with each batch of
        the loader, before the step that trains on it (rows already recorded are skipped: a sample a DDP
        loader repeats to even out the ranks' steps). Disabled: nothing."""
        if not self.enabled:
            return
        if not self._recording:
            raise BackMixError("record(batch) outside the in-loop rebuild's block: call it inside "
                               "`with backmix.rebuilding(loader, model) as rebuild:`")
        if batch.canvas is None:
            raise BackMixError("the batch carries no canvas: start the in-loop rebuild before iterating the "
                               "loader")
        self._recorded += 1
        rows = batch.indices.cpu().numpy()
        new = ~self.writer.holds(rows)
        if new.all():
            self.writer.add_canvases(batch.canvas, batch.indices)
        elif new.any():
            keep = np.flatnonzero(new)
            self.writer.add_canvases(batch.canvas[keep], batch.indices[keep])

    def save_rows(self, path) -> dict:
        """The rows recorded so far, as one Arrow file of the shard format at ``path`` (atomically); returns
        what to keep to take them back: the row count, the file's CRC-32 and the seconds spent on them."""
        rows, maps = self.writer.held()
        crc = write_maps(path, rows, self.writer.index.labels[rows], maps, self.writer.meta)
        return {"rows": int(len(rows)), "crc32": crc, "cam_s": float(self.cam_seconds)}

    def load_rows(self, path, saved: dict) -> None:
        """Take back, into a recorder just started, the rows ``save_rows`` wrote to ``path`` (``saved``: what
        it returned); a file of another build, or another file than the one saved, is refused."""
        part = MappedMaps(path)
        if part.meta.get("crc32") != saved.get("crc32") or len(part) != saved.get("rows"):
            raise BackMixError(f"{path} is not the file of recorded CAMs that was saved with the checkpoint "
                               f"({len(part)} rows, CRC {part.meta.get('crc32')}; saved: {saved.get('rows')} "
                               f"rows, CRC {saved.get('crc32')})")
        if {k: part.meta.get(k) for k in self.writer.meta} != self.writer.meta:
            raise BackMixError(f"{path} holds CAMs of another cache build (weights, generation, data set or rows)")
        self.writer.take(part.rows, part.maps)
        self._recorded += len(part.rows)
        self.writer.cam_seconds = float(saved.get("cam_s", 0.0))

    def stop(self) -> None:
        if self._recording:
            self._recording = False
            self.loader.keep_canvases(self._canvases_before)
            _RECORDING.pop(self.loader, None)

    def stage(self) -> int:
        """Every rank writes its shard (rows no rank saw are computed by a pass); returns the generation."""
        self.stop()
        if not self._recorded:   # legitimate only for a loop resumed at its epoch's end
            log.warning("no batch reached the in-loop rebuild: every row's CAM comes from a pass over the "
                        "weights of now (a loop hands each batch to rebuild.record(batch), before its step)")
        cfg = self.loader.config
        self.staged = stage_generation(self.writer.cache_dir, self.model, self.loader.index, canvas=cfg.canvas,
                                       mean=cfg.mean, std=cfg.std, writer=self.writer, batch_size=self.batch_size,
                                       num_workers=cfg.num_workers, device=next(self.model.parameters()).device,
                                       progress=self.progress)
        return self.staged

    def publish(self) -> int:
        """Rank 0 makes the staged generation current (on every rank: call after ``stage``)."""
        self.generation = publish_staged(self.writer.cache_dir, self.staged)
        return self.generation

    def __enter__(self) -> "InLoopRebuild":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()
        if exc_type is None and self.enabled:
            if self.staged is None:
                self.stage()
            if self.generation is None:
                self.publish()

