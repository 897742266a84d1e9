"""The contract every loader keeps, and the torch stage that fills it.

A loader yields ``BackMixBatch``es. ``BatchTransform`` is the device-side half
shared by the reference loader (and FFCV's GPU path): decoded canvases in,
mixed/cropped/flipped/normalised tensors out, in BackMix's order.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from backmix.cam_cache.maps import ForegroundMaps

from .augment import IMAGENET_MEAN, IMAGENET_STD, BackMix, Normalize, RandomCropFlip, RandomResizedCropFlip
from .backmix import top_k_mask
from .sampling import BackMixSampler

if TYPE_CHECKING:
    from .config import LoaderConfig


class BackMixBatch(NamedTuple):
    canvas: Tensor            # uint8 [B, 3, S, S]: decoded, un-augmented ("raw"); CAMs use it
    images: Optional[Tensor]  # float [B, 3, s, s]: cropped, flipped, normalised, not mixed; None if not asked for
    mixed: Optional[Tensor]   # float [B, 3, s, s]: same crop and flip, mixed; None without BackMix
    labels: Tensor            # int64 [B]: dataset labels (the index file's)
    indices: Tensor           # int64 [B]: dataset indices (row numbers of the index file)


class BatchTransform:
    """Mix, then crop/flip (or resized crop/flip), then normalise, for one batch of canvases on any device."""

    def __init__(self, maps: ForegroundMaps, sampler: BackMixSampler, *, backmix: bool = True,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 train: bool = True, clean: bool = True) -> None:
        self.maps, self.sampler, self.enabled, self.train = maps, sampler, backmix, train
        self.clean = clean or not backmix
        self.mix = BackMix(sampler.top_k_ratio, sampler.box_fraction, mean)
        # Evaluation draws the centre crop at the crop size: nothing to resize.
        resize = sampler.augment == "rrc" and train
        self.crop = (RandomResizedCropFlip if resize else RandomCropFlip)(sampler.crop)
        self.normalize = Normalize(mean, std)

    @classmethod
    def for_config(cls, maps: ForegroundMaps, config: "LoaderConfig") -> "BatchTransform":
        return cls(maps, config.sampler(), backmix=config.backmix, mean=config.mean, std=config.std,
                   train=config.train, clean=config.clean)

    def params(self, batch_size: int, epoch: int, step: int, rank: int, device) -> dict[str, Tensor]:
        return self.sampler.draw(batch_size, epoch, step, rank, train=self.train).torch(device)

    def __call__(self, canvas: Tensor, labels: Tensor, indices: Tensor, *, epoch: int, step: int,
                 rank: int = 0) -> BackMixBatch:
        p = self.params(canvas.shape[0], epoch, step, rank, canvas.device)
        images = mixed = None
        if self.enabled:
            maps = torch.from_numpy(self.maps.gather(indices.cpu().numpy())).to(canvas.device)
            mixed = self.mix(canvas, maps, p)
            if self.clean:
                images, mixed = self.normalize(self.crop(torch.cat([canvas, mixed]), same_crop_twice(p))).chunk(2)
            else:
                mixed = self.normalize(self.crop(mixed, p))
        else:
            images = self.normalize(self.crop(canvas, p))
        return BackMixBatch(canvas, images, mixed, labels, indices)


def host_masks(maps: ForegroundMaps, rows: np.ndarray, top_k_ratio: float, tie_break: np.ndarray) -> np.ndarray:
    """bool [B, g, g]: the top-k cells of the current maps of dataset ``rows``, on the host
    (the DALI and FFCV ops take them as inputs)."""
    soft = torch.from_numpy(np.ascontiguousarray(maps.gather(rows), dtype=np.float32))
    return top_k_mask(soft, top_k_ratio, torch.from_numpy(tie_break)).numpy()


def same_crop_twice(p: dict[str, Tensor]) -> dict[str, Tensor]:
    """The same crop and flip for the clean and the mixed copy of each image."""
    return {"crops": p["crops"].repeat(2, 1), "flips": p["flips"].repeat(2), "crop_sizes": p["crop_sizes"].repeat(2, 1)}


def as_index_array(x) -> np.ndarray:
    return np.asarray(x, dtype=np.int64)
