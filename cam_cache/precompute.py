"""CAM precompute: the next cache generation from the current model.

The CAMs themselves (``class_activation_maps``, ``compute_cams``) are ``cam_cache/cams.py``.

Generation n+1 = (1 - m) * generation n + m * CAM, blended in float32 and
rounded to float16 once. A ``GenerationWriter`` holds one shard of it: rows come
in as CAMs of canvases already in memory (the training loop's batches) or from
a decoding pass, and the shard is written atomically at the end. Shards are
disjoint sets of rows, ``next-<n+1>/shard-k-of-N.arrow``; the generation is
published once all N are there, merged in dataset order whatever N was, so 1
and N processes give the same file. A shard of another build (weights, base,
data set, momentum, rows) is dropped, never mixed in.

Two ways to fill the shards:

- separate pass (``build_generation``, ``backmix cache build``, ``--regen pass``):
  shard k of N decodes and computes ``rows[k::N]`` with one set of weights; a
  finished shard is not recomputed after a restart.
- in-loop (``backmix.rebuilding``, ``--regen loop``; ``cam_cache/recorder.py``):
  each training batch's un-augmented canvases reach ``GenerationWriter.add_canvases``
  as the loader hands the batch out, before the step that trains on it, so image
  i's CAM uses the weights of the step i is trained at (no_grad, BatchNorm in eval
  mode, the loaders' normalisation, as the pass; no RNG is drawn, so training is unchanged). Rank k
  holds the rows it trained on.

Finishing a build under torch.distributed (stage every rank's shard, then publish;
resume) is ``cam_cache/rebuild.py``.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from backmix.models import features_and_head
from backmix.osr_data.errors import NO_SPACE_ERRNOS, BackMixError, no_space
from backmix.osr_data.index import ImageIndex
from backmix.osr_data.normalize import Normalize

from .cams import body_features, class_activation_maps, compute_cams
from .generation_file import MappedMaps, write_maps
from .store import (ForegroundCache, build_lock, generation_path, pending_dir, prune, publish_lock, read_pointer,
                    write_pointer)

log = logging.getLogger("backmix")


def _shard_path(cache_dir: Path, generation: int, shard: tuple[int, int]) -> Path:
    return pending_dir(cache_dir, generation) / f"shard-{shard[0]}-of-{shard[1]}.arrow"


def _rows_digest(rows: np.ndarray, labels: np.ndarray) -> str:
    """Names which rows a build recomputes and as which classes: a shard of another build is stale."""
    return hashlib.sha256(np.ascontiguousarray(rows, np.int64).tobytes()
                          + np.ascontiguousarray(labels, np.int64).tobytes()).hexdigest()[:16]


def _check_pending(folder: Path, world: int, expected: dict[str, str]) -> None:
    """Refuse a pending build made with another shard count; drop shards of another build
    (other weights, base generation, data set, momentum or rows), which would mix two models' maps."""
    for path in sorted(folder.glob("shard-*-of-*.arrow")):
        n = int(path.stem.rsplit("-", 1)[1])
        if n != world:
            raise BackMixError(f"world size does not match the cache shards: a pending build in {folder} "
                               f"was made with {n} shards, this one has {world}; finish it with {n} "
                               f"processes (--shard k/{n}) or delete {folder}")
        try:
            meta = MappedMaps(path).meta
            stale = {k: meta.get(k) for k in expected} != expected
        except BackMixError:
            stale = True   # a half-written shard cannot exist (atomic rename), but a foreign file can
        if stale:
            log.info("dropping %s: made by another build", path)
            path.unlink(missing_ok=True)


class GenerationWriter:
    """Shard k of N of generation n+1, filled row by row, written at once (see module doc).

    Rows come in as CAMs of canvases already in memory (``add_canvases``: the
    training loop's batches, taken with the weights of that step) or from a
    decoding pass (``compute``: the separate pass). Each row is blended with
    generation n as it arrives, so only this shard's float16 maps are held.
    ``label_map`` maps dataset labels to the model's classes (-1: not a class of
    the model); ``rows`` (default: all) are the build's rows, the others keep
    their maps. ``on_error`` "skip": a row whose file does not decode in ``compute``
    is left out of the shard, so it keeps its map of generation n (publishing copies
    generation n's maps for every row no shard holds).
    """

    def __init__(self, cache_dir: str | os.PathLike, model: nn.Module, index: ImageIndex, *, canvas: int,
                 mean: Sequence[float], std: Sequence[float], momentum: float = 0.1,
                 label_map: Optional[np.ndarray] = None, rows: Optional[np.ndarray] = None,
                 shard: tuple[int, int] = (0, 1), checkpoint_digest: str = "",
                 canvas_mode: str = "center", on_error: str = "raise") -> None:
        k, world = shard
        if not 0 <= k < world:
            raise BackMixError(f"shard {k}/{world}: need 0 <= k < N")
        if not 0.0 <= momentum <= 1.0:
            raise BackMixError(f"momentum must lie in [0, 1], got {momentum}")
        _, head = features_and_head(model)            # refuse a model without a CAM head before any work
        self.cache_dir, self.model, self.index, self.shard = Path(cache_dir), model, index, shard
        self.canvas, self.mean, self.std, self.momentum = canvas, tuple(mean), tuple(std), float(momentum)
        # CAMs on the canvases the loaders mix: a cache of another canvas mode is refused.
        self.canvas_mode, self.on_error = canvas_mode, on_error
        self.base = ForegroundCache(self.cache_dir, index=index, canvas_mode=canvas_mode)
        self.generation = self.base.generation + 1
        self.rows = np.arange(len(index)) if rows is None else np.asarray(rows, dtype=np.int64)
        if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= len(index)):
            raise BackMixError(f"cache rebuild: rows must lie in 0..{len(index) - 1}")
        lut = np.arange(index.num_classes) if label_map is None else np.asarray(label_map, dtype=np.int64)
        labels = lut[index.labels[self.rows]]
        if (labels < 0).any():
            raise BackMixError("cache rebuild: some rows have a label the model does not know; "
                               "pass only rows of its classes")
        if labels.size and labels.max() >= head.out_features:
            raise BackMixError(f"cache rebuild: the model has {head.out_features} classes but rows are "
                               f"labelled up to {labels.max()}; pass a label_map to its classes")
        self._class_of = np.full(len(index), -1, dtype=np.int64)   # dataset row -> model class, -1 outside
        self._class_of[self.rows] = labels
        self._done = np.zeros(len(index), dtype=bool)
        self._chunks: list[tuple[np.ndarray, np.ndarray]] = []
        self._unwritten = False                         # rows added since the shard file was written
        self.cam_seconds = 0.0                          # time spent in add_canvases (the in-loop overhead)
        self.meta = {"generation": str(self.generation), "base": str(self.base.generation),
                     "momentum": str(self.momentum), "checkpoint": checkpoint_digest,
                     "dataset": index.fingerprint(), "rows": _rows_digest(self.rows, labels),
                     "canvas_mode": canvas_mode}

    @property
    def path(self) -> Path:
        return _shard_path(self.cache_dir, self.generation, self.shard)

    @property
    def done_rows(self) -> np.ndarray:
        """The dataset rows this shard holds so far, ascending."""
        return np.flatnonzero(self._done)

    def holds(self, rows: np.ndarray) -> np.ndarray:
        """bool per dataset row of ``rows``: whether this shard has it already."""
        return self._done[np.asarray(rows, dtype=np.int64)]

    def add(self, rows: np.ndarray, cams: np.ndarray) -> None:
        """Blend float32 CAMs [B, g, g] of dataset ``rows`` into this shard: (1 - m) S_n + m CAM."""
        rows = np.asarray(rows, dtype=np.int64)
        if (self._class_of[rows] < 0).any() or self._done[rows].any() or len(np.unique(rows)) != len(rows):
            raise BackMixError("cache rebuild: a row outside the build, or a row twice "
                               f"(rows {rows[:8].tolist()}...)")
        # float32 arithmetic, one rounding to float16 per generation
        new = (1.0 - self.momentum) * self.base.gather(rows) + self.momentum * cams
        self._chunks.append((rows, new.astype(np.float16)))
        self._done[rows] = True
        self._unwritten = True

    def add_canvases(self, canvas: Tensor, rows: Tensor) -> None:
        """CAMs of a batch of un-augmented uint8 canvases with the model's current weights, BatchNorm in
        eval mode (the input and mode of the separate pass), without touching its training state."""
        t0 = time.perf_counter()
        rows_np = rows.cpu().numpy()
        body, head = features_and_head(self.model)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                y = torch.as_tensor(self._class_of[rows_np], device=canvas.device)
                x = Normalize(self.mean, self.std)(canvas)
                cams = class_activation_maps(body_features(body, x), head.weight, y, self.base.grid, self.canvas)
        finally:
            self.model.train(was_training)
        self.add(rows_np, cams.cpu().numpy())
        self.cam_seconds += time.perf_counter() - t0

    def compute(self, rows: np.ndarray, *, batch_size: int = 128, num_workers: int = 2,
                device: str | torch.device = "auto", progress: bool = True) -> None:
        """The separate pass for ``rows``: decode, CAMs with the model's current weights, blend."""
        k, world = self.shard
        cams = compute_cams(self.model, self.index, rows, self._class_of[rows], canvas=self.canvas,
                            grid=self.base.grid, canvas_mode=self.canvas_mode, mean=self.mean, std=self.std, batch_size=batch_size,
                            num_workers=num_workers, device=device, progress=progress,
                            desc=f"CAMs gen {self.generation}" + (f" shard {k}/{world}" if world > 1 else ""),
                            on_error=self.on_error)
        decoded = ~np.isnan(cams).any(axis=(1, 2))     # NaN: skipped, it keeps generation n's map
        self.add(np.asarray(rows)[decoded], cams[decoded])

    def take_pending(self) -> None:
        """Check the pending build folder; a writer fed no rows takes over its own shard file of the same
        build, if one is there (a finished shard is not recomputed)."""
        folder = pending_dir(self.cache_dir, self.generation)
        folder.mkdir(exist_ok=True)
        _check_pending(folder, self.shard[1], self.meta)
        if not self._chunks and self.path.exists():
            part = MappedMaps(self.path)
            self._chunks.append((np.array(part.rows), np.array(part.maps)))
            self._done[part.rows] = True

    def write(self) -> None:
        """Atomically write this shard (its rows ascending); nothing to do for a shard taken over whole."""
        if not self._unwritten and self.path.exists():
            return
        rows = np.concatenate([r for r, _ in self._chunks]) if self._chunks else np.empty(0, np.int64)
        maps = (np.concatenate([m for _, m in self._chunks]) if self._chunks
                else np.empty((0, self.base.grid, self.base.grid), np.float16))
        order = np.argsort(rows, kind="stable")
        write_maps(self.path, rows[order], self.index.labels[rows[order]], maps[order], self.meta)
        self._unwritten = False


def build_generation(cache_dir: str | os.PathLike, model: nn.Module, index: ImageIndex, *, canvas: int,
                     canvas_mode: str = "center", mean: Sequence[float], std: Sequence[float], momentum: float = 0.1,
                     label_map: Optional[np.ndarray] = None, rows: Optional[np.ndarray] = None,
                     batch_size: int = 128, num_workers: int = 2, device: str = "auto",
                     shard: tuple[int, int] = (0, 1), checkpoint_digest: str = "", publish: bool = True,
                     progress: bool = True) -> Optional[int]:
    """Compute this shard of generation n+1 by a separate pass; publish it when every shard is there.

    For independent processes (``backmix cache build --shard k/N``): shard k of N
    computes ``rows[k::N]``. Returns the new generation number when it was
    published (by this call or, meanwhile, by another shard's), else None. Under
    torch.distributed use ``rebuild_cache`` (``cam_cache/rebuild.py``).
    CAMs are taken on ``canvas_mode`` canvases, the mode the cache records; a cache of another mode
    is refused.
    """
    with build_lock(cache_dir, shard):
        return _build_shard(cache_dir, model, index, canvas=canvas, canvas_mode=canvas_mode, mean=mean, std=std,
                            momentum=momentum,
                            label_map=label_map, rows=rows, batch_size=batch_size, num_workers=num_workers,
                            device=device, shard=shard, checkpoint_digest=checkpoint_digest, publish=publish,
                            progress=progress)


def _build_shard(cache_dir, model, index, *, canvas, canvas_mode, mean, std, momentum, label_map, rows, batch_size,
                 num_workers, device, shard, checkpoint_digest, publish, progress) -> Optional[int]:
    writer = GenerationWriter(cache_dir, model, index, canvas=canvas, mean=mean, std=std, momentum=momentum,
                              label_map=label_map, rows=rows, shard=shard, checkpoint_digest=checkpoint_digest,
                              canvas_mode=canvas_mode)
    k, world = shard
    writer.take_pending()
    if len(writer.done_rows):
        log.info("shard %d/%d of generation %d is already built", k, world, writer.generation)
    else:
        try:
            writer.compute(writer.rows[k::world], batch_size=batch_size, num_workers=num_workers, device=device,
                           progress=progress)
            writer.write()
        except BaseException as e:
            with contextlib.suppress(OSError):   # the pending folder, if no shard is in it (a full disk)
                writer.path.parent.rmdir()
            if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
                raise no_space(e, writing=writer.path) from None
            raise
    if not publish:
        return None
    shards = sorted(pending_dir(writer.cache_dir, writer.generation).glob(f"shard-*-of-{world}.arrow"))
    if len(shards) < world:
        log.info("generation %d: %d of %d shards built; it is published when all are", writer.generation,
                 len(shards), world)
        return None
    return publish_generation(cache_dir, writer.generation)


def publish_generation(cache_dir: str | os.PathLike, generation: Optional[int] = None) -> int:
    """Merge the complete shards of generation n+1 into its file and make it current.

    With ``generation`` given, a generation another process published meanwhile
    counts as done (the shards of a build race to publish; one wins).
    """
    cache_dir = Path(cache_dir)
    with publish_lock(cache_dir):
        ptr = read_pointer(cache_dir)
        if generation is not None and int(ptr["generation"]) >= generation:
            return generation
        current = ForegroundCache(cache_dir)
        nxt = current.generation + 1
        folder = pending_dir(cache_dir, nxt)
        shards = sorted(folder.glob("shard-*-of-*.arrow"))
        if not shards:
            raise BackMixError(f"no build of generation {nxt} is pending in {cache_dir}")
        world = int(shards[0].stem.rsplit("-", 1)[1])
        if any(int(p.stem.rsplit("-", 1)[1]) != world for p in shards):
            raise BackMixError(f"the pending build in {folder} mixes shard counts; delete {folder} and rebuild")
        missing = sorted(set(range(world)) - {int(p.stem.split("-")[1]) for p in shards})
        if missing:
            raise BackMixError(f"generation {nxt} is not complete: shard(s) {missing} of {world} are missing")
        parts = [MappedMaps(p) for p in shards]
        keys = ("base", "dataset", "checkpoint", "momentum", "rows", "canvas_mode")
        for part in parts:
            if (part.meta.get("base") != str(current.generation)
                    or part.meta.get("dataset") != current.meta.get("dataset")):
                raise BackMixError(f"shard {part.path} was built on another generation or data set than "
                                   f"{generation_path(cache_dir, current.generation)}; delete {folder} and rebuild")
            if [part.meta.get(k) for k in keys] != [parts[0].meta.get(k) for k in keys]:
                raise BackMixError(f"shards {parts[0].path.name} and {part.path.name} come from different "
                                   f"builds; delete {folder} and rebuild")
            if part.canvas_mode != current.canvas_mode:
                raise BackMixError(f"shard {part.path} holds maps of {part.canvas_mode!r} canvases, the cache "
                                   f"{current.canvas_mode!r} ones; delete {folder} and rebuild")
            if part.grid != current.grid or (len(part) and (part.rows.min() < 0 or part.rows.max() >= len(current))):
                raise BackMixError(f"shard {part.path} does not fit the cache (grid or rows)")
        maps = np.array(current.maps)            # float16 copy of the current generation
        for part in parts:
            maps[part.rows] = part.maps
        meta = {k: parts[0].meta.get(k, "") for k in ("momentum", "checkpoint", "base")}
        write_maps(generation_path(cache_dir, nxt), np.arange(len(maps)), current.labels, maps,
                   {**meta, "generation": nxt, "dataset": current.meta.get("dataset", ""),
                    "canvas_mode": current.canvas_mode})
        del parts, current                       # unmap before deleting the shards
        keep = int(ptr.get("keep", 3))
        write_pointer(cache_dir, nxt, keep)
        shutil.rmtree(folder, ignore_errors=True)
        prune(cache_dir, nxt, keep)
        log.info("published generation %d of %s", nxt, cache_dir)
        return nxt
