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
from backmix.osr_data.normalize import IMAGENET_MEAN, IMAGENET_STD, Normalize

from .augment import AutoAugment, BackMix, RandomCropFlip, RandomResizedCropFlip, auto_augment_seed
from .backmix import box_size, top_k_mask
from .sampling import BackMixSampler

if TYPE_CHECKING:
    from backmix.osr_data.canvas_reads import Photos
    from .config import LoaderConfig


class BackMixBatch(NamedTuple):
    canvas: Optional[Tensor]  # uint8 [B, 3, S, S]: decoded, un-augmented ("raw"); CAMs use it. None when the
                              # loader was told not to keep it (``keep_canvas``) and nothing rebuilds from it
    images: Optional[Tensor]  # float [B, 3, s, s]: cropped, flipped, normalised, not mixed; None if not asked for
    mixed: Optional[Tensor]   # float [B, 3, s, s]: same crop and flip, mixed; None without BackMix
    labels: Tensor            # int64 [B], on the device: the targets of a loss (closed-set 0..K-1 under a
                              # label map; -1 marks an unknown class, which only an evaluation loader serves)
    dataset_labels: Tensor    # int64 [B], host: the index file's labels (to score unknown classes)
    indices: Tensor           # int64 [B], host: dataset indices (row numbers of the index file)
    second: Optional[Tensor] = None  # float [B, 3, s, s]: the two-view baseline's second clean crop of each
                                     # image, cropped and flipped independently of ``images``; else None

    def inputs(self) -> tuple[Tensor, Tensor]:
        """(x, y) for one forward pass: the clean crops, then the mixed ones, then the second clean view
        (each may be absent), and their targets (``labels`` once per part). The mixed copy keeps its
        image's label."""
        parts = [t for t in (self.images, self.mixed, self.second) if t is not None]
        x = torch.cat(parts) if len(parts) > 1 else parts[0]
        return x, self.labels.repeat(len(parts))

    def loss(self, criterion, logits: Tensor, *, clean: float = 1.0, mixed: float = 1.0,
             targets: Optional[Tensor] = None) -> Tensor:
        """``clean`` * criterion(clean part) + ``mixed`` * criterion(mixed part) of the logits of ``inputs()``;
        the two-view baseline's second view is weighted as the mixed part (the same loss as BackMix's
        clean + mixed, on two clean views). ``targets``: instead of ``labels``, one row per row of
        ``inputs()`` (in its order), e.g. the soft targets [P * B, K] of Mixup/CutMix
        (``nn.CrossEntropyLoss`` takes probabilities)."""
        weights = [w for t, w in ((self.images, clean), (self.mixed, mixed), (self.second, mixed)) if t is not None]
        n = self.labels.shape[0]
        if targets is not None and targets.shape[0] != n * len(weights):
            raise ValueError(f"targets has {targets.shape[0]} rows, the batch's inputs {n * len(weights)}")
        parts = [self.labels] * len(weights) if targets is None else targets.split(n)
        return sum(w * criterion(logits[k * n:(k + 1) * n], parts[k]) for k, w in enumerate(weights))


class RowLabels:
    """Per dataset row, the label a loss reads (through ``label_map``: dataset label -> 0..K-1, -1 for
    an unknown class; none: the dataset label itself) and the dataset label; batched by ``take``."""

    def __init__(self, dataset_labels: np.ndarray, label_map: Optional[np.ndarray] = None) -> None:
        self.dataset = np.asarray(dataset_labels, dtype=np.int64)
        self.label_map = None if label_map is None else np.asarray(label_map, dtype=np.int64)
        self.targets = self.dataset if label_map is None else self.label_map[self.dataset]

    def take(self, rows: np.ndarray, device) -> tuple[Tensor, Tensor, Tensor]:
        """(labels on ``device``, dataset labels, indices), the last two on the host: the fields of a batch."""
        return (to_device(torch.from_numpy(self.targets[rows]), device),
                torch.from_numpy(self.dataset[rows]), torch.from_numpy(np.asarray(rows, dtype=np.int64)))


def to_device(t: Tensor, device) -> Tensor:
    """A host tensor on ``device``: from pinned memory and asynchronous for CUDA (the host does not
    wait for the copy), the tensor itself for the CPU."""
    device = torch.device(device)
    if t.device.type == device.type and device.type == "cpu":
        return t                      # already on the host: the tensor itself, nothing copied
    if device.type == "cpu" or t.device.type != "cpu":
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


class BatchTransform:
    """Mix, then crop/flip (or resized crop/flip), then normalise, for one batch of canvases on any device."""

    def __init__(self, maps: ForegroundMaps, sampler: BackMixSampler, *, backmix: bool = True,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 train: bool = True, clean: bool = True, auto_augment: str = "none") -> None:
        self.maps, self.sampler, self.enabled, self.train = maps, sampler, backmix, train
        self.clean = clean or not backmix
        self.mix = BackMix(sampler.top_k_ratio, sampler.box_fraction, mean)
        # Evaluation draws the centre crop at the crop size: nothing to resize.
        resize = sampler.augment == "rrc" and train
        self.crop = (RandomResizedCropFlip if resize else RandomCropFlip)(sampler.crop)
        self.normalize = Normalize(mean, std)
        self.auto_augment = AutoAugment(auto_augment, mean) if train and auto_augment != "none" else None

    @classmethod
    def for_config(cls, maps: ForegroundMaps, config: "LoaderConfig") -> "BatchTransform":
        return cls(maps, config.sampler(), backmix=config.backmix, mean=config.mean, std=config.std,
                   train=config.train, clean=config.clean, auto_augment=config.auto_augment)

    def params(self, batch_size: int, epoch: int, step: int, rank: int, device,
               sizes: Optional[np.ndarray] = None) -> dict[str, Tensor]:
        p = self.sampler.draw(batch_size, epoch, step, rank, train=self.train, sizes=sizes)
        return {k: to_device(v, device) for k, v in p.torch().items()}

    @property
    def crops_images(self) -> bool:
        """Whether the crops are cut from the whole images (``Photos``), not from the canvases."""
        return self.sampler.crops_images(self.train)

    def __call__(self, canvas: Tensor, rows: np.ndarray, *, epoch: int, step: int,
                 rank: int = 0, maps: Optional[np.ndarray] = None,
                 photos: Optional["Photos"] = None) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(images, mixed) of a batch's canvases (on any device); ``rows``: its dataset indices, on the
        host, where the maps are gathered (no device-to-host read per batch). ``maps``: the rows' soft
        maps gathered already (a worker transforming the batch is handed them), instead of ``self.maps``.
        ``photos``: the batch's whole images, which the crops are cut from when ``crops_images``
        (then mixed in their own pixels; the canvases are not read)."""
        if self.crops_images:
            return self._of_images(photos, rows, epoch=epoch, step=step, rank=rank, maps=maps)
        p = self.params(canvas.shape[0], epoch, step, rank, canvas.device)
        after_crop = self._after_crop(epoch, rank, step)

        images = mixed = None
        if self.enabled:
            soft = self.maps.gather(as_index_array(rows)) if maps is None else maps
            mixed = self.mix(canvas, to_device(torch.from_numpy(soft), canvas.device), p)
            if self.clean and self._crops_the_box_again(canvas):
                # The CPU's way: the mixed crop is the clean one but where it reads the box (bit for bit).
                images, mixed = self.crop.clean_and_mixed(
                    canvas, mixed, p, box_size(tuple(canvas.shape[-2:]), self.mix.box_fraction), self.normalize)
            elif self.clean:
                images, mixed = after_crop(self.crop(torch.cat([canvas, mixed]), same_crop_twice(p)), 2).chunk(2)
            else:
                mixed = after_crop(self.crop(mixed, p))
        else:
            images = after_crop(self.crop(canvas, p))
        return images, mixed

    def _after_crop(self, epoch: int, rank: int, step: int):
        """What follows the crop: the auto augmentation (when asked for), then the normalisation."""
        def after_crop(crops: Tensor, copies: int = 1) -> Tensor:
            if self.auto_augment is not None:
                crops = self.auto_augment(crops, auto_augment_seed(self.sampler.seed, epoch, rank, step), copies)
            return self.normalize(crops)
        return after_crop

    def _of_images(self, photos: Optional["Photos"], rows: np.ndarray, *, epoch: int, step: int, rank: int,
                   maps: Optional[np.ndarray]) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """``__call__`` with the crops cut from the whole images: the boxes drawn in each image's size."""
        if photos is None:
            raise ValueError("crops cut from the image (crop_from='image') need the batch's whole images (photos)")
        pixels, dev = photos.pixels, photos.pixels.device
        p = self.params(pixels.shape[0], epoch, step, rank, dev, sizes=photos.sizes.numpy())
        after_crop = self._after_crop(epoch, rank, step)

        if not self.enabled:
            return after_crop(self.crop(pixels, p)), None
        soft = self.maps.gather(as_index_array(rows)) if maps is None else maps
        mixed = self.mix.of_images(pixels, to_device(photos.sizes, dev), to_device(torch.from_numpy(soft), dev), p,
                                   self.sampler.canvas)
        if not self.clean:
            return None, after_crop(self.crop(mixed, p))
        images, mixed = after_crop(self.crop(torch.cat([pixels, mixed]), same_crop_twice(p)), 2).chunk(2)
        return images, mixed

    def _crops_the_box_again(self, canvas: Tensor) -> bool:
        """Whether the mixed resized crop is made from the clean one (``clean_and_mixed``): on the CPU, where
        a second whole crop is the cost, and with nothing between the crop and the normalisation."""
        return (canvas.device.type == "cpu" and isinstance(self.crop, RandomResizedCropFlip)
                and self.auto_augment is None)


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
