"""The loader core: what every backend shares, written once. A backend is a small ``Source``.

    EpochSampler ──plan──► Source.batches(plan) ──SourceBatch──► Loader ──BackMixBatch──► training loop
                           │ kind "decode": uint8 canvases;     │ position (epoch, step; state_dict),
                           │   the core mixes them              │ maps.refresh() each epoch, on_error,
                           │   (BatchTransform)                 │ closed-set labels, device transfer,
                           │ kind "fused": images and mixed     │ the canvases when wanted
                           │   made by the source's own ops     │
                           │   from LoaderView.inputs(step,rows)│

The plan is the epoch's list of (step, dataset rows), from the resume step on. A source turns it
into one ``SourceBatch`` per step that has any image left, in step order, and reports the files
that failed; it never decides what a failure means (the core's ``on_error`` does) and never draws
randomness (every random choice of a batch is ``BackMixSampler``'s, a pure function of
(seed, epoch, rank, step), which ``inputs`` hands to fused sources).
"""
from __future__ import annotations

import logging
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from backmix.cam_cache.maps import ForegroundMaps, UniformMaps
from backmix.device import choose_device
from backmix.osr_data.canvas_reads import Photos, undecodable
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.index import ImageIndex

from .batch import BackMixBatch, BatchTransform, RowLabels, host_masks, to_device
from .config import LoaderConfig, LoaderPosition
from .sampling import BatchParams, EpochSampler, mixed_rows

log = logging.getLogger("backmix")

Plan = list[tuple[int, np.ndarray]]   # (step, dataset rows) of each batch still to make this epoch


def loader_inputs(index: ImageIndex, config: LoaderConfig, maps: Optional[ForegroundMaps],
                  indices: Optional[np.ndarray],
                  label_map: Optional[np.ndarray] = None) -> tuple[ForegroundMaps, np.ndarray, EpochSampler, RowLabels]:
    """What every backend derives from its arguments: the maps (generation 0 when none are
    given), the dataset rows it serves (default: all), their order per epoch, and their labels
    (closed-set through ``label_map``; a training loader refuses rows of unknown classes)."""
    maps = maps if maps is not None else UniformMaps(len(index), config.grid)
    if maps.grid != config.grid:
        raise BackMixError(f"foreground maps have grid {maps.grid}, the loader expects {config.grid}")
    # A cache records the canvas its CAMs were taken on; maps of another canvas would misplace the foreground.
    maps_mode = getattr(maps, "canvas_mode", None)
    if maps_mode is not None and maps_mode != config.canvas_mode:
        raise BackMixError(f"foreground maps were made on {maps_mode!r} canvases, the loader makes "
                           f"{config.canvas_mode!r} ones (--canvas-mode)")
    rows = np.arange(len(index)) if indices is None else np.asarray(indices, dtype=np.int64)
    order = EpochSampler(len(rows), config.batch_size, shuffle=config.shuffle, seed=config.seed,
                         rank=config.rank, world_size=config.world_size, last_batch=config.last_batch)
    labels = RowLabels(index.labels, label_map)
    if label_map is not None and config.train:
        unknown = int((labels.targets[rows] < 0).sum())
        if unknown:
            raise BackMixError(f"{unknown} of the {len(rows)} training images belong to classes outside the "
                               f"label map (unknown classes): a loss cannot take them; pass the known rows")
    return maps, rows, order, labels


class SourceBatch(NamedTuple):
    """One step's output of a source."""
    step: int
    rows: np.ndarray                  # int64 [n]: the dataset rows that decoded, in batch order
    canvas: Optional[Tensor]          # uint8 [n, 3, S, S] (host or device); None when n == 0, or when
                                      # a fused source leaves it out (not ``Loader.wants_canvas``)
    failed: list                      # per failed file: its path, a DecodeError, or the BackMixError of a
                                      # file missing or changed since indexing
    images: Optional[Tensor] = None   # fused sources: the clean crops (float [n, 3, s, s])
    mixed: Optional[Tensor] = None    # fused sources: the mixed crops
    photos: Optional[Photos] = None   # crops cut from the image (``LoaderConfig.crops_images``): the whole
                                      # images the core cuts them from (host or device)


def canvases_fit(canvas: Tensor, n: int, size: int) -> bool:
    """Whether ``canvas`` is what a source must hand on: uint8 [n, 3, size, size]. Only the tensor's
    metadata is read: nothing waits for the device."""
    return canvas.dtype == torch.uint8 and tuple(canvas.shape) == (n, 3, size, size)


class Source:
    """A backend: turns the plan into ``SourceBatch``es. ``kind`` "decode": canvases only (the core
    mixes, crops and normalises them); "fused": also ``images`` and ``mixed``, made by the source's
    own ops from ``LoaderView.inputs(step, rows)`` and held to ``BatchTransform`` by the tests.

    A source gets what it needs as arguments: ``__init__`` the index, config, device and its own
    options (checked, files opened); ``rows`` the dataset rows asked for; ``open`` the rows it serves
    and a read-only ``LoaderView`` of the loader; ``batches`` each epoch's plan. It writes nothing of
    the loader's."""

    kind = "decode"
    # Why this backend cannot hand the core whole images (``SourceBatch.photos``) for crops cut from the
    # image (``LoaderConfig.crops_images``); None: it can. A loader refuses the option with this reason
    # rather than serve the canvas stream.
    whole_images_refused: Optional[str] = "it hands the loader canvases only"

    def __init__(self, index: ImageIndex, config: LoaderConfig, device: torch.device) -> None:
        self.index, self.config, self.device = index, config, device

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The rows this source can serve of those asked for (a beton leaves out images it could not
        store); the loader counts the rest as skipped."""
        return rows

    def open(self, rows: np.ndarray, view: "LoaderView") -> None:
        """Start what makes batches (workers, pipelines): ``rows`` are the dataset rows served, ``view``
        what the source may read of the loader from now on."""
        self.dataset_rows, self.view = rows, view

    def batches(self, plan: Plan) -> Iterator[SourceBatch]:
        raise NotImplementedError

    def close(self) -> None:
        """Stop workers now (see ``Loader.close``)."""


class LoaderView:
    """What a source reads of its loader while it serves batches, and nothing else: the epoch being
    served, whether canvases are wanted, each batch's params and masks, the rows' soft maps, the
    batch transform (for workers that transform their own batches) and the mix's box size."""

    __slots__ = ("_loader",)

    def __init__(self, loader: "Loader") -> None:
        self._loader = loader

    @property
    def epoch(self) -> int:
        return self._loader.epoch

    @property
    def wants_canvas(self) -> bool:
        return self._loader.wants_canvas

    @property
    def transform(self) -> BatchTransform:
        return self._loader.transform

    @property
    def box_hw(self) -> tuple[int, int]:
        return self._loader.sampler.box_hw

    def inputs(self, step: int, rows: np.ndarray, sizes: Optional[np.ndarray] = None) -> tuple[BatchParams, np.ndarray]:
        return self._loader.inputs(step, rows, sizes)

    def maps_of(self, rows: np.ndarray) -> np.ndarray:
        """float32 [n, g, g]: the current soft maps of dataset ``rows``."""
        return self._loader.maps.gather(rows)


class Loader(LoaderPosition):
    """Yields ``BackMixBatch`` for the images ``indices`` (default: all) of ``index`` from ``source_class``
    (a ``Source``; ``options`` go to it); ``label_map`` (dataset label -> 0..K-1) gives the batches
    closed-set labels."""

    def __init__(self, source_class: type[Source], index: ImageIndex, config: LoaderConfig,
                 maps: Optional[ForegroundMaps] = None, indices: Optional[np.ndarray] = None,
                 label_map: Optional[np.ndarray] = None, **options) -> None:
        self.index, self.config = index, config
        self.backend = getattr(source_class, "name", source_class.__name__)
        self.device = choose_device(config.device)
        self._start_position()
        self._canvases_kept = False   # ``keep_canvases``
        refused = source_class.whole_images_refused
        if config.crops_images and refused:
            raise BackMixError(f"backend {getattr(source_class, 'name', source_class.__name__)!r} cannot cut crops "
                               f"from the whole image (--crop-from image): {refused}")
        self.source = source_class(index, config, self.device, **options)
        asked = np.arange(len(index)) if indices is None else np.asarray(indices, dtype=np.int64)
        rows = self.source.rows(asked)
        self.skipped += len(asked) - len(rows)
        self.maps, self.dataset_indices, self.epoch_sampler, self.row_labels = loader_inputs(
            index, config, maps, rows, label_map)
        self.transform = BatchTransform.for_config(self.maps, config)
        self.sampler = self.transform.sampler
        # The two-view baseline's second crop of every canvas, the same torch stage for every backend.
        self.second_view = BatchTransform(self.maps, config.sampler(view=1), backmix=False, mean=config.mean,
                                          std=config.std, train=config.train, auto_augment=config.auto_augment
                                          ) if config.views == 2 else None
        self.source.open(self.dataset_indices, LoaderView(self))

    @property
    def wants_canvas(self) -> bool:
        """Whether sources send the canvas: a batch carries it (``carries_canvas``), or the core crops it a
        second time (the two-view baseline). Without it no source copies or sends it."""
        return self.carries_canvas or self.config.views == 2

    @property
    def carries_canvas(self) -> bool:
        """Whether batches carry the canvas: asked for by the config (``config.keep_canvas``) or since
        (``keep_canvases``)."""
        return self.config.keep_canvas or self._canvases_kept

    def keep_canvases(self, keep: bool = True) -> None:
        """Whether batches carry their uint8 canvases from here on (they do anyway with ``config.keep_canvas``): an
        in-loop rebuild (``backmix.rebuilding``) asks before the epoch whose batches it reads. Asked part-way
        through an epoch, every later batch carries it (a source makes the batches it made ahead again)."""
        if not isinstance(keep, (bool, np.bool_)):
            raise TypeError(f"keep_canvases: keep must be True or False, not {type(keep).__name__}")
        self._canvases_kept = bool(keep)

    def inputs(self, step: int, rows: np.ndarray, sizes: Optional[np.ndarray] = None) -> tuple[BatchParams, np.ndarray]:
        """(params, masks) of the batch of dataset ``rows`` at ``step``: what a fused source mixes with.
        masks: bool [n, g, g], the top-k cells of each row's current map (all False where nothing is
        mixed: without BackMix, or for a lone image, which has no partner). ``sizes``: int [n, 2], each
        image's height and width, for crops cut from the image (``LoaderConfig.crops_images``)."""
        cfg = self.config
        p = self.sampler.draw(len(rows), self.epoch, step, cfg.rank, train=cfg.train, sizes=sizes)
        if cfg.backmix and len(rows) > 1:
            masks = host_masks(self.maps, rows, self.sampler.top_k_ratio, p.tie_break)
        else:
            masks = np.zeros((len(rows), cfg.grid, cfg.grid), dtype=bool)
        return p, masks

    def __iter__(self) -> Iterator[BackMixBatch]:
        self.maps.refresh()   # a new cache generation takes effect at an epoch boundary
        batches = self.source.batches(self.epoch_plan())
        try:
            for out in batches:
                self.report(out.failed)
                if len(out.rows) == 0:
                    continue          # every file of the step failed: the step is used up
                self.next_step = out.step + 1
                yield self._build_batch(out)
        finally:
            batches.close()           # a source left part-way (an error, a break) cleans up now
        self.next_step = len(self)

    def _build_batch(self, out: SourceBatch) -> BackMixBatch:
        rows, dev = np.asarray(out.rows, dtype=np.int64), self.device
        if out.canvas is not None:
            self.check_canvas(out.canvas, len(rows))
        photos = None if out.photos is None else Photos(to_device(out.photos.pixels, dev), out.photos.sizes)
        if out.images is None and out.mixed is None:   # canvases only: the core transforms the batch
            canvas = to_device(out.canvas, dev)
            images, mixed = self.transform(canvas, rows, epoch=self.epoch, step=out.step, rank=self.config.rank,
                                           photos=photos)
        else:
            canvas, images, mixed = (None if t is None else to_device(t, dev) for t in (out.canvas, out.images, out.mixed))
        cfg, second = self.config, None
        if cfg.mix_prob is not None and images is not None and mixed is not None:
            chosen = mixed_rows(self.sampler.seed, self.epoch, cfg.rank, out.step, len(rows), cfg.mix_prob)
            mixed, images = torch.where(to_device(torch.from_numpy(chosen), dev)[:, None, None, None], mixed, images), None
        if self.second_view is not None:
            second, _ = self.second_view(canvas, rows, epoch=self.epoch, step=out.step, rank=cfg.rank,
                                         photos=photos)
        return BackMixBatch(canvas if self.carries_canvas else None, images, mixed, *self.row_labels.take(rows, dev),
                            second=second)

    def check_canvas(self, canvas: Tensor, n: int) -> None:
        """A source's canvases are uint8 [n, 3, S, S] (``canvases_fit``): another shape or dtype (a
        registered backend's ``decode`` gone wrong) would be mixed and normalised into wrong images
        without a word."""
        size = self.config.canvas
        if not canvases_fit(canvas, n, size):
            raise BackMixError(f"backend {self.backend!r} made canvases of {str(canvas.dtype).replace('torch.', '')} "
                               f"{list(canvas.shape)}; a source's canvases must be uint8 [{n}, 3, {size}, {size}]")

    def report(self, failed: list) -> None:
        """The ``on_error`` policy, for every backend (``undecodable``): a file missing or changed since
        indexing stops the loader whatever the policy; one that does not decode raises under "raise"
        and is skipped, counted and logged under "skip"."""
        errors = undecodable(failed, self.config.on_error)
        self.skipped += len(errors)
        for e in errors:
            log.warning("skipped %s: it does not decode (%d skipped so far)", e.path, self.skipped)

    def close(self) -> None:
        """Stop the source's workers now rather than at garbage collection (a forked child collecting an
        inherited loader's workers asserts "can only test a child process")."""
        self.source.close()
