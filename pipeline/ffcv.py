"""The FFCV loader: a .beton of canvases in, the common ``BackMixBatch`` stream out.

The beton stores every image already resized to the square canvas (see
``pipeline.beton``), so FFCV's ``SimpleRGBImageDecoder`` yields canvases; in
"raw" mode they are the reference loader's canvases bit for bit.

Order: FFCV's loader is built in sequential order over our rows and its
traversal order is replaced by ours (``EpochSampler``'s batches, flattened),
so FFCV cuts exactly our batches. The mix is an FFCV ``Operation`` after the
decoder: it finds its batch's step from the sample indices FFCV hands it
(batches run on several threads, so call order means nothing), draws that
step's params from the shared ``BackMixSampler``, and runs a mix kernel
compiled by FFCV's ``Compiler`` (numba) with the per-batch tables as
arguments. It writes the raw and the mixed canvas side by side, so nothing is
decoded twice. Crop, flip and normalise are the torch ops every loader shares.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from cam_cache.maps import ForegroundMaps
from osr_data.errors import BackMixError
from osr_data.index import ImageIndex

from .augment import Normalize, RandomCropFlip, fill_value
from .backmix import top_k_mask
from .batch import BackMixBatch, _twice
from .beton import default_beton_path, require_ffcv, write_beton
from .config import LoaderConfig, choose_device, loader_inputs

log = logging.getLogger("backmix")


def mix_hwc(images, out, partners, boxes, masks, fill, bh, bw, cell):
    """images uint8 [B, S, S, 3] -> out [B, 2, S, S, 3]: raw, then mixed (``mix_backgrounds``' arithmetic)."""
    b = images.shape[0]
    for i in range(b):
        out[i, 0] = images[i]
        out[i, 1] = images[i]
    if b < 2:
        return out
    for i in range(b):
        j = partners[i]
        sy, sx, dy, dx = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3]
        for y in range(bh):
            for x in range(bw):
                if masks[j, (sy + y) // cell, (sx + x) // cell]:
                    out[i, 1, dy + y, dx + x, :] = fill
                else:
                    out[i, 1, dy + y, dx + x, :] = images[j, sy + y, sx + x, :]
    return out


class _OurOrder:
    """Stands in for FFCV's traversal order: our batches, flattened, and where each sample sits."""

    def __init__(self, loader: "FfcvLoader") -> None:
        self.loader = loader

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.loader.epoch_order(epoch)


def _mix_operation(loader: "FfcvLoader"):
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation

    kernel = Compiler.compile(mix_hwc)

    class BackMixOperation(Operation):
        """FFCV op: decoded canvases [B, S, S, 3] -> [B, 2, S, S, 3] (raw, mixed). State: the loader's tables."""

        def generate_code(self):
            def mix(images, dst, indices):
                p, masks = loader.batch_tables(np.asarray(indices, dtype=np.int64))
                return kernel(images, dst[:len(images)], p.partners, p.boxes, masks, loader.fill,
                              *loader.sampler.box_hw, loader.config.canvas // loader.config.grid)
            mix.with_indices = True
            return mix

        def declare_state_and_memory(self, previous_state):
            s = previous_state.shape
            return (replace(previous_state, jit_mode=False, shape=(2, *s)),
                    AllocationQuery((2, *s), np.dtype("u1")))

    return BackMixOperation()


class FfcvLoader:
    """Yields ``BackMixBatch`` for the images ``indices`` (default: all) of ``index``, from an FFCV .beton."""

    backend = "ffcv"

    def __init__(self, index: ImageIndex, config: LoaderConfig, maps: Optional[ForegroundMaps] = None,
                 indices: Optional[np.ndarray] = None, *, beton: Optional[str | Path] = None) -> None:
        require_ffcv()
        from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption

        self.index, self.config = index, config
        self.maps, self.dataset_indices, self.epoch_sampler = loader_inputs(index, config, maps, indices)
        self.sampler = config.sampler()
        self.device = choose_device(config.device)
        self.fill = fill_value(config.mean).numpy()
        self.crop, self.normalize = RandomCropFlip(config.crop), Normalize(config.mean, config.std)
        self.beton = Path(beton) if beton else default_beton_path(index, config.canvas)
        if not self.beton.exists():
            if beton:
                raise BackMixError(f"beton {self.beton} does not exist; write it with `backmix data write-beton`")
            log.info("writing %s (once)", self.beton)
            write_beton(index, self.beton, canvas=config.canvas)
        self.epoch, self.skipped = 0, 0
        self._position: dict[int, tuple[int, int]] = {}
        image = [SimpleRGBImageDecoder()] + ([_mix_operation(self)] if config.backmix else [])
        try:
            self._ffcv = Loader(str(self.beton), batch_size=config.batch_size,
                                num_workers=max(1, config.num_workers), order=OrderOption.SEQUENTIAL,
                                indices=self.dataset_indices, drop_last=False, batches_ahead=2,
                                pipelines={"image": image, "label": [IntDecoder()], "index": [IntDecoder()]})
        except (ValueError, KeyError, AssertionError) as e:
            raise BackMixError(f"{self.beton} is not a backmix beton ({e})") from None
        reader = self._ffcv.reader
        meta = reader.metadata[f"f{list(reader.handlers).index('image')}"]
        if reader.num_samples != len(index) or not (
                (meta["height"] == config.canvas) & (meta["width"] == config.canvas)).all():
            raise BackMixError(f"{self.beton} holds {self._ffcv.reader.num_samples} images that are not all "
                               f"{config.canvas}x{config.canvas}; the data set has {len(index)}: "
                               "write it again with `backmix data write-beton`")
        self._ffcv.traversal_order = _OurOrder(self)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.epoch_sampler)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Our batches of ``epoch`` flattened to dataset ids; remembers (step, slot) of every id."""
        batches = [self.dataset_indices[b] for b in self.epoch_sampler.batches(epoch)]
        self._position = {int(i): (step, slot) for step, ids in enumerate(batches) for slot, i in enumerate(ids)}
        return np.concatenate(batches).astype(np.uint64)

    def batch_tables(self, ids: np.ndarray):
        """The shared sampler's params and the top-k masks of the batch holding dataset ids ``ids``."""
        step = self._position[int(ids[0])][0]
        p = self.sampler.draw(len(ids), self.epoch, step, self.config.rank)
        soft = torch.from_numpy(self.maps.gather(ids))
        masks = top_k_mask(soft, self.sampler.top_k_ratio, torch.from_numpy(p.tie_break)).numpy()
        return p, masks

    def __iter__(self) -> Iterator[BackMixBatch]:
        self.maps.refresh()   # a new cache generation takes effect at an epoch boundary
        self._ffcv.next_epoch = self.epoch
        for step, (images, labels, ids) in enumerate(self._ffcv):
            # FFCV reuses its buffers for later batches: take our copy now.
            x = torch.from_numpy(np.array(images)).to(self.device, non_blocking=True)
            ids = torch.from_numpy(np.asarray(ids).reshape(-1).astype(np.int64)).to(self.device)
            labels = torch.from_numpy(np.asarray(labels).reshape(-1).astype(np.int64)).to(self.device)
            p = self.sampler.draw(len(ids), self.epoch, step, self.config.rank).torch(self.device)
            if not self.config.train:
                p["crops"] = torch.full_like(p["crops"], (self.config.canvas - self.config.crop) // 2)
                p["flips"] = torch.zeros_like(p["flips"])
            if self.config.backmix:
                both = x.permute(1, 0, 4, 2, 3).reshape(2 * len(ids), 3, *x.shape[2:4])   # raw..., mixed...
                canvas = both[:len(ids)]
                images, mixed = self.normalize(self.crop(both, _twice(p))).chunk(2)
            else:
                canvas = x.permute(0, 3, 1, 2)
                images, mixed = self.normalize(self.crop(canvas, p)), None
            yield BackMixBatch(canvas.contiguous(), images, mixed, labels, ids)
