"""All randomness of the pipeline, drawn once per batch from a seeded generator.

``EpochSampler`` decides which dataset indices form each batch (shuffle per epoch,
shard per rank, last-batch policy). ``BackMixSampler`` draws every random choice
of one batch (partners, boxes, tie-breaks, crops or RandomResizedCrop boxes, flips) as a pure function of
(seed, epoch, rank, step), so every loader given the same key makes the same
batch, and a resumed run makes the batches it would have made.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from backmix.osr_data.errors import BackMixError
from backmix.osr_data.options import CROP_FROM

from .backmix import box_size

LAST_BATCH = ("keep", "drop")
# What follows the mix: "crop" = random crop + flip; "rrc" = RandomResizedCrop + flip.
AUGMENTS = ("crop", "rrc")
# torchvision RandomResizedCrop's defaults, and its number of tries before the fallback.
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RRC_TRIES = 10


class EpochSampler:
    """The order of one rank's samples in one epoch, cut into batches.

    ``positions`` are positions into the loader's list of dataset indices.
    last_batch="keep": rank r takes every world_size-th sample, so across ranks each
    sample appears once and the last batch may be short. Every rank makes the same
    number of steps (what DistributedDataParallel needs): in the one case where the
    ranks' counts would give a rank one batch more (n = W*q*B + t, 0 < t < W), each
    rank short of it repeats its own first sample at the end, as ``DistributedSampler``
    pads (``repeats``); the in-loop rebuild takes that sample's CAM once.
    last_batch="drop": every rank gets the same number of full batches; the remainder
    is dropped, a different one each epoch.
    """

    def __init__(self, num_samples: int, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, last_batch: str = "keep") -> None:
        check_batch_size(batch_size)
        if not 0 <= rank < world_size:
            raise BackMixError(f"rank {rank} is outside world size {world_size}")
        check_last_batch(last_batch)
        if num_samples < 1:
            raise BackMixError("the loader has no samples")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world_size, self.last_batch = rank, world_size, last_batch

    def positions(self, epoch: int) -> np.ndarray:
        n = self.num_samples
        order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                 else np.arange(n))
        if self.last_batch == "drop":
            per_rank = (n // self.world_size) // self.batch_size * self.batch_size
            return order[self.rank * per_rank:(self.rank + 1) * per_rank]
        own = order[self.rank::self.world_size]
        if self.repeats:
            own = np.append(own, order[self.rank % n])   # this rank's first sample (any, if it has none)
        return own

    @property
    def repeats(self) -> bool:
        """Whether this rank repeats one sample under last_batch="keep" to make as many steps as the others."""
        most = -(-self.num_samples // self.world_size)                        # the largest rank's count
        mine = len(range(self.rank, self.num_samples, self.world_size))
        steps = lambda count: -(-count // self.batch_size)                    # noqa: E731
        return self.last_batch == "keep" and steps(mine) < steps(most)

    def batches(self, epoch: int) -> list[np.ndarray]:
        pos = self.positions(epoch)
        return [pos[i:i + self.batch_size] for i in range(0, len(pos), self.batch_size)]

    def __len__(self) -> int:
        return len(self.batches(0))


@dataclass(frozen=True)
class BatchParams:
    """Every random choice of one batch (numpy, int64 unless noted)."""
    partners: np.ndarray    # [B]
    boxes: np.ndarray       # [B, 4] src_y, src_x, dst_y, dst_x
    tie_break: np.ndarray   # [B, g*g]
    crops: np.ndarray       # [B, 2] top-left corner of the crop in the canvas (crop_from "image": in the image)
    flips: np.ndarray       # bool [B]
    crop_sizes: np.ndarray  # [B, 2] height, width of the crop in the canvas (the crop size unless rrc)

    def torch(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(getattr(self, k)).to(device, non_blocking=True)
                for k in ("partners", "boxes", "tie_break", "crops", "flips", "crop_sizes")}


def check_crop_from(crop_from: str, augment: str = "rrc", canvas_mode: Optional[str] = None) -> str:
    """``crop_from`` when it goes with ``augment`` and (when given) ``canvas_mode``; else one line."""
    if crop_from not in CROP_FROM:
        raise BackMixError(f"crop_from must be one of {', '.join(CROP_FROM)}, got {crop_from!r}")
    if crop_from == "image" and augment != "rrc":
        raise BackMixError("crop_from='image' (--crop-from image) draws RandomResizedCrop boxes in the image: "
                           "it needs augment='rrc' (--augment rrc)")
    if crop_from == "image" and canvas_mode not in (None, "stretch"):
        raise BackMixError("crop_from='image' (--crop-from image) needs canvas_mode='stretch' (--canvas-mode "
                           "stretch): the foreground grid must cover the whole image the crops are cut from")
    return crop_from


def check_augment(augment: str) -> str:
    if augment not in AUGMENTS:
        raise BackMixError(f"--augment (augment) must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    return augment


def check_batch_size(batch_size: int) -> int:
    if batch_size < 1:
        raise BackMixError(f"--batch-size (batch_size) must be at least 1, got {batch_size}")
    return batch_size


def check_last_batch(last_batch: str) -> str:
    if last_batch not in LAST_BATCH:
        raise BackMixError(f"last_batch must be one of {', '.join(LAST_BATCH)}, got {last_batch!r}")
    return last_batch


def resized_crop_boxes(rng: np.random.Generator, b: int, heights, widths) -> tuple[np.ndarray, np.ndarray]:
    """(corners [B, 2], sizes [B, 2]): torchvision ``RandomResizedCrop.get_params`` for B images at once,
    image i being heights[i] x widths[i] pixels (ints: every image that size). Each image draws
    ``RRC_TRIES`` candidates together and keeps the first that fits; an image with none takes
    torchvision's fallback: the central crop of the whole image, its ratio clamped to ``RRC_RATIO``
    (on a square canvas: all of it)."""
    height = np.broadcast_to(np.asarray(heights, dtype=np.int64), (b,))[:, None]
    width = np.broadcast_to(np.asarray(widths, dtype=np.int64), (b,))[:, None]
    area = (height * width).astype(np.float64)
    target = area * rng.uniform(*RRC_SCALE, (b, RRC_TRIES))
    aspect = np.exp(rng.uniform(np.log(RRC_RATIO[0]), np.log(RRC_RATIO[1]), (b, RRC_TRIES)))
    # np.round rounds half to even, as Python's round() in torchvision does.
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.argmax(axis=1)
    rows = np.arange(b)
    found = fits[rows, first]
    height, width = height[:, 0], width[:, 0]
    in_ratio = width / height
    narrow, wide = in_ratio < min(RRC_RATIO), in_ratio > max(RRC_RATIO)
    fallback_h = np.where(narrow, np.round(width / min(RRC_RATIO)).astype(np.int64), height)
    fallback_w = np.where(wide, np.round(height * max(RRC_RATIO)).astype(np.int64), width)
    h = np.where(found, h[rows, first], fallback_h)
    w = np.where(found, w[rows, first], fallback_w)
    # Every image draws its corner (a fallback's draw is then replaced by the centre), so the draws
    # after these do not depend on which images fell back.
    top = np.where(found, rng.integers(0, height - h + 1), (height - h) // 2)
    left = np.where(found, rng.integers(0, width - w + 1), (width - w) // 2)
    return np.stack([top, left], axis=1).astype(np.int64), np.stack([h, w], axis=1).astype(np.int64)


def mixed_rows(seed: int, epoch: int, rank: int, step: int, batch_size: int, prob: float) -> np.ndarray:
    """bool [B]: which images of a batch train on their mixed crop under a mix probability (the rest on
    their clean one): each with probability ``prob``, from a generator of its own, so the batch's other
    draws are those of every other recipe."""
    return np.random.default_rng([seed, epoch, rank, step, 0x3B]).random(batch_size) < prob


def view_seed(seed: int, view: int) -> int:
    """The seed of a further independently augmented view of each image (view 0 is ``seed`` itself)."""
    return seed if view == 0 else int(np.random.SeedSequence([seed, view, 0x2F]).generate_state(1, np.uint64)[0] >> 1)


def check_seed(seed: int, name: str = "seed") -> int:
    """A seed numpy's generators take: a whole number in [0, 2**63)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{name} must be a whole number (int), not {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise BackMixError(f"{name} must be a whole number in [0, 2**63), got {seed!r}")
    return int(seed)


def check_fraction(name: str, value: float) -> float:
    """``value`` of argument ``name`` (the command line's --name too) when it lies in (0, 1)."""
    if not 0.0 < float(value) < 1.0:
        raise BackMixError(f"{'--' + name.replace('_', '-')} ({name}) must lie in (0, 1), got {value}")
    return float(value)


class BackMixSampler:
    """Draws ``BatchParams``; state is (seed, sizes, ratios) and nothing else."""

    def __init__(self, *, canvas: int, crop: int, grid: int = 8, box_fraction: float = 0.25,
                 top_k_ratio: float = 0.25, seed: int = 0, augment: str = "crop", crop_from: str = "canvas") -> None:
        self.canvas, self.crop, self.grid, self.seed = canvas, crop, grid, seed
        self.augment = check_augment(augment)
        self.crop_from = check_crop_from(crop_from, augment)
        self.box_fraction = check_fraction("box_fraction", box_fraction)
        self.top_k_ratio = check_fraction("top_k_ratio", top_k_ratio)
        self.box_hw = box_size((canvas, canvas), self.box_fraction)

    def crops_images(self, train: bool = True) -> bool:
        """Whether the draw's crops are boxes in each image's own pixels (crop_from "image", training):
        evaluation keeps the canvas's centre crop."""
        return self.crop_from == "image" and train

    def draw(self, batch_size: int, epoch: int, step: int, rank: int = 0, *, train: bool = True,
             sizes: Optional[np.ndarray] = None) -> BatchParams:
        """train=False (evaluation): the same draw, with the centre crop (torchvision CenterCrop's
        corner), no flip and no resize. ``sizes``: int [B, 2], each image's height and width, which
        the RandomResizedCrop boxes of crop_from "image" are drawn in (``crops_images``)."""
        b, g, (bh, bw) = batch_size, self.grid, self.box_hw
        rng = np.random.default_rng([self.seed, epoch, rank, step, 0xBAC])
        # A random cycle through the batch: nobody is their own partner and
        # every image lends its background exactly once.
        cycle = rng.permutation(b)
        partners = np.empty(b, dtype=np.int64)
        partners[cycle] = np.roll(cycle, -1)
        boxes = np.stack([rng.integers(0, self.canvas - bh + 1, b), rng.integers(0, self.canvas - bw + 1, b),
                          rng.integers(0, self.canvas - bh + 1, b), rng.integers(0, self.canvas - bw + 1, b)],
                         axis=1).astype(np.int64)
        tie_break = rng.random((b, g * g)).argsort(axis=1).astype(np.int64)
        crops = rng.integers(0, self.canvas - self.crop + 1, (b, 2)).astype(np.int64)
        flips = rng.random(b) < 0.5
        crop_sizes = np.full((b, 2), self.crop, dtype=np.int64)
        if not train:
            crops = np.full_like(crops, int(round((self.canvas - self.crop) / 2.0)))
            flips = np.zeros_like(flips)
        elif self.augment == "rrc":
            # Drawn after everything else, so that "crop" keeps its stream.
            if self.crops_images(train):
                if sizes is None or np.shape(sizes) != (b, 2):
                    raise ValueError(f"crop_from='image' draws boxes in each image: sizes must be [{b}, 2] "
                                     f"(height, width), got {None if sizes is None else np.shape(sizes)}")
                sizes = np.asarray(sizes, dtype=np.int64)
                crops, crop_sizes = resized_crop_boxes(rng, b, sizes[:, 0], sizes[:, 1])
            else:
                crops, crop_sizes = resized_crop_boxes(rng, b, self.canvas, self.canvas)
        return BatchParams(partners, boxes, tie_break, crops, flips, crop_sizes)
