"""Batched augmentations on tensors: each a small class around one kernel.

Geometric augmentation follows the mix (BackMix's order). Randomness comes in
through ``BatchParams``; these classes hold only their configuration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from backmix.osr_data.normalize import IMAGENET_MEAN, Normalize, new_batch, normalize  # noqa: F401  (Normalize: the benchmarks import it from here)

from .backmix import box_size, mix_backgrounds, mix_image_backgrounds, top_k_mask


def crop_flip(images: Tensor, offsets: Tensor, flips: Tensor, size: int, per_image: Optional[bool] = None) -> Tensor:
    """[B, C, H, W] -> [B, C, size, size]: crop at per-image offsets, mirror where ``flips``.
    On the CPU a copy of each image's slice (much faster there than the batched gather); on a GPU one
    gather for the batch (``per_image`` forces either way; the tests hold the two equal)."""
    b, c, h, w = images.shape
    if images.device.type == "cpu" if per_image is None else per_image:
        out = new_batch((b, c, size, size), images.dtype, images.device)
        for i, ((y, x), flip) in enumerate(zip(offsets.tolist(), flips.tolist())):
            crop = images[i, :, y:y + size, x:x + size]
            out[i] = crop.flip(-1) if flip else crop
        return out
    r = torch.arange(size, device=images.device)
    ys = offsets[:, 0:1] + r
    xs = offsets[:, 1:2] + r
    xs = torch.where(flips[:, None], xs.flip(1), xs)
    # One gather over the flattened plane: twice as fast as 4-D advanced indexing, and contiguous.
    pixels = (ys[:, :, None] * w + xs[:, None, :]).reshape(b, 1, size * size).expand(b, c, size * size)
    return images.reshape(b, c, h * w).gather(2, pixels).reshape(b, c, size, size)


def resize_sources(starts: Tensor, lengths: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear resampling of a span of ``lengths`` pixels from ``starts`` to ``size`` pixels, per image
    (int64 [B] each): (lo, hi) int64 [B, size], the two source pixels of each output pixel, and
    float32 [B, size], the weight of ``hi``. Pixel centres (align_corners=False), the source clamped
    to the span: F.interpolate(bilinear, antialias=False) of the cropped span, as one table."""
    out = torch.arange(size, device=starts.device, dtype=torch.float32) + 0.5
    scale = lengths.to(torch.float32)[:, None] / size
    pos = (out * scale - 0.5).clamp_(min=0.0)
    pos = torch.minimum(pos, (lengths - 1).to(torch.float32)[:, None])
    lo = pos.floor()
    weight = pos - lo
    lo = lo.long()
    hi = torch.minimum(lo + 1, (lengths - 1)[:, None])
    return starts[:, None] + lo, starts[:, None] + hi, weight


def resize_tables(corners: Tensor, sizes: Tensor, flips: Tensor, size: int) -> tuple[Tensor, ...]:
    """(y0, y1, wy, x0, x1, wx), each [B, size]: ``resize_sources`` of each box's rows and columns,
    the columns mirrored where ``flips``. What the torch op and FFCV's kernel both read."""
    y0, y1, wy = resize_sources(corners[:, 0], sizes[:, 0], size)
    x0, x1, wx = resize_sources(corners[:, 1], sizes[:, 1], size)
    x0, x1, wx = (torch.where(flips[:, None], t.flip(1), t) for t in (x0, x1, wx))
    return y0, y1, wy, x0, x1, wx


def _resample(image: Tensor, y0: Tensor, y1: Tensor, wy: Tensor, x0: Tensor, x1: Tensor, wx: Tensor,
              out: Optional[Tensor] = None) -> Tensor:
    """One image's bilinear resample, [C, H, W] uint8 -> float32 [C, columns, rows] (transposed): rows
    blended first, r = a + wy (b - a), then columns, r0 + wx (r1 - r0); ``x0``/``x1`` index ``image``'s
    columns. Into ``out`` when given. The one arithmetic of the CPU's resized crops."""
    top = image.index_select(1, y0).float()
    rows = top.add_(wy[None, :, None] * (image.index_select(1, y1).float() - top))   # [C, rows, width]
    columns = rows.transpose(1, 2).contiguous()   # [C, width, rows]: a column is a row to select
    left, right = columns.index_select(1, x0), columns.index_select(1, x1)
    if out is None:
        return left.add_(wx[None, :, None] * (right - left))
    return torch.add(left, wx[None, :, None] * (right - left), out=out)


def _resized_crop_into(out: Tensor, image: Tensor, x: int, width: int, tables: list[Tensor]) -> None:
    """One image's resized crop (its box's columns start at ``x``, ``width`` of them; ``tables``: its
    row of ``resize_tables``) into ``out``, its [C, size, size] slot: the CPU's way."""
    y0, y1, wy, x0, x1, wx = tables
    # the box's columns only: no blend is wasted
    _resample(image[:, :, x:x + width], y0, y1, wy, x0 - x, x1 - x, wx, out=out.transpose(1, 2))


def resized_crop_flip(images: Tensor, corners: Tensor, sizes: Tensor, flips: Tensor, size: int,
                      per_image: Optional[bool] = None) -> Tensor:
    """[B, C, H, W] -> float32 [B, C, size, size]: the box (corner, height x width) of each image resized
    bilinearly to size x size (``resize_sources``; no antialiasing), mirrored where ``flips``.
    Separable, in float32: the two source rows of each output row are blended,
    r = a + wy (b - a), then the two source columns of each output column, out = r0 + wx (r1 - r0).
    On a GPU the whole batch is one gather per step; on the CPU each image is four ``index_select``s
    of whole rows and columns of its box (faster there than the batched gather, whose index tensor
    is as large as its output), with the same arithmetic in the same order: the two agree bit for bit
    (``per_image`` forces either way)."""
    b, c, h, w = images.shape
    tables = resize_tables(corners, sizes, flips, size)
    y0, y1, wy, x0, x1, wx = tables
    if images.device.type == "cpu" if per_image is None else per_image:
        out = new_batch((b, c, size, size), torch.float32, images.device)
        for i, (x, width) in enumerate(zip(corners[:, 1].tolist(), sizes[:, 1].tolist())):
            _resized_crop_into(out[i], images[i], x, width, [t[i] for t in tables])
        return out

    def rows(ys: Tensor) -> Tensor:
        return images.gather(2, ys[:, None, :, None].expand(b, c, size, w)).float()

    top = rows(y0)
    blended = top.add_(wy[:, None, :, None] * (rows(y1) - top))       # [B, C, size, W]

    def columns(xs: Tensor) -> Tensor:
        return blended.gather(3, xs[:, None, None, :].expand(b, c, size, size))

    left = columns(x0)
    return left.add_(wx[:, None, None, :] * (columns(x1) - left))


def resized_crops_clean_and_mixed(canvas: Tensor, mixed: Tensor, corners: Tensor, sizes: Tensor, flips: Tensor,
                                  size: int, boxes: Tensor, box_hw: tuple[int, int],
                                  after_crop: Optional[Callable[[Tensor], Tensor]] = None) -> tuple[Tensor, Tensor]:
    """(``after_crop(resized_crop_flip(canvas))``, the same of ``mixed``), bit for bit, on the CPU, where
    ``mixed`` is ``canvas`` but inside each image's pasted box (``boxes[:, 2:]``, ``box_hw``) and
    ``after_crop`` a per-pixel float op in place (the normalisation) or None: the mixed crop is the clean
    one copied, with only the output pixels that read the box resampled (then ``after_crop``) from ``mixed``. Every
    pixel is its own blend of four source pixels, in the same float32 operations in the same order, so a
    window computes exactly what the whole crop does there."""
    after_crop = after_crop or (lambda x: x)
    shape = (*canvas.shape[:2], size, size)
    clean, out = new_batch(shape, torch.float32, canvas.device), new_batch(shape, torch.float32, canvas.device)
    tables = resize_tables(corners, sizes, flips, size)
    y0, y1, wy, x0, x1, wx = tables
    (bh, bw), dys, dxs = box_hw, boxes[:, 2].tolist(), boxes[:, 3].tolist()
    for i, (x, width, dy, dx) in enumerate(zip(corners[:, 1].tolist(), sizes[:, 1].tolist(), dys, dxs)):
        # Image by image, so the copy reads a crop still in the cache (a whole batch's is 38 MB at 224).
        _resized_crop_into(clean[i], canvas[i], x, width, [t[i] for t in tables])
        clean[i].copy_(after_crop(clean[i:i + 1])[0])
        out[i].copy_(clean[i])
        # The output rows and columns that read the box: one run each (the tables are monotone).
        rows = (((y0[i] >= dy) & (y0[i] < dy + bh)) | ((y1[i] >= dy) & (y1[i] < dy + bh))).nonzero()
        cols = (((x0[i] >= dx) & (x0[i] < dx + bw)) | ((x1[i] >= dx) & (x1[i] < dx + bw))).nonzero()
        if len(rows) == 0 or len(cols) == 0:
            continue
        r, c = slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)
        left_x, right_x = x0[i, c], x1[i, c]
        start = int(torch.minimum(left_x, right_x).min())
        image = mixed[i, :, :, start:int(torch.maximum(left_x, right_x).max()) + 1]
        window = _resample(image, y0[i, r], y1[i, r], wy[i, r], left_x - start, right_x - start, wx[i, c])
        out[i, :, r, c].copy_(after_crop(window[None])[0].transpose(1, 2))
    return clean, out


def fill_value(mean: tuple[float, ...]) -> Tensor:
    """The uint8 blank colour: the normalisation mean, i.e. ~0 after ``normalize`` (the nearest uint8
    colour for a mean outside [0, 1])."""
    return torch.tensor([min(255, max(0, round(255.0 * m))) for m in mean], dtype=torch.uint8)


@dataclass(frozen=True)
class BackMix:
    top_k_ratio: float = 0.25
    box_fraction: float = 0.25
    mean: tuple[float, ...] = IMAGENET_MEAN

    def __call__(self, canvases: Tensor, maps: Tensor, p: dict[str, Tensor]) -> Tensor:
        masks = top_k_mask(maps, self.top_k_ratio, p["tie_break"])
        return mix_backgrounds(canvases, p["partners"], masks, p["boxes"],
                               box_size(tuple(canvases.shape[-2:]), self.box_fraction),
                               fill_value(self.mean).to(canvases.device))

    def of_images(self, images: Tensor, sizes: Tensor, maps: Tensor, p: dict[str, Tensor], canvas: int) -> Tensor:
        """The mix of whole images (``mix_image_backgrounds``): p's boxes on each image's stretched
        ``canvas``; sizes int64 [B, 2] on the images' device."""
        masks = top_k_mask(maps, self.top_k_ratio, p["tie_break"])
        return mix_image_backgrounds(images, sizes, p["partners"], masks, p["boxes"],
                                     box_size((canvas, canvas), self.box_fraction), canvas,
                                     fill_value(self.mean).to(images.device))


@dataclass(frozen=True)
class RandomCropFlip:
    size: int

    def __call__(self, images: Tensor, p: dict[str, Tensor]) -> Tensor:
        return crop_flip(images, p["crops"], p["flips"], self.size)


@dataclass(frozen=True)
class RandomResizedCropFlip:
    """torchvision's RandomResizedCrop (boxes drawn by ``BackMixSampler``) + flip; float out."""
    size: int

    def __call__(self, images: Tensor, p: dict[str, Tensor]) -> Tensor:
        return resized_crop_flip(images, p["crops"], p["crop_sizes"], p["flips"], self.size)

    def clean_and_mixed(self, canvas: Tensor, mixed: Tensor, p: dict[str, Tensor], box_hw: tuple[int, int],
                        after_crop: Optional[Callable[[Tensor], Tensor]] = None) -> tuple[Tensor, Tensor]:
        """(after_crop(self(canvas, p)), after_crop(self(mixed, p))) of canvases ``mixed`` differs from only in
        p's boxes."""
        return resized_crops_clean_and_mixed(canvas, mixed, p["crops"], p["crop_sizes"], p["flips"], self.size,
                                             p["boxes"], box_hw, after_crop)


AUTO_AUGMENT_POLICIES = ("trivialaugment", "randaugment")


@dataclass(frozen=True)
class AutoAugment:
    """torchvision's TrivialAugmentWide or RandAugment (v2 ops, on the batch's device) on uint8 crops:
    after the mix and the crop, before normalising, as torchvision's references place it. One draw per
    image, shared by its ``copies`` (the clean and the mixed crop stay a pair that differs only by
    the mix). Geometric ops fill with the normalisation mean (~0 after ``normalize``, as the mix's blank)."""
    policy: str
    mean: tuple[float, ...] = IMAGENET_MEAN

    def __call__(self, crops: Tensor, seed: int, copies: int = 1) -> Tensor:
        from torchvision.transforms import v2
        if self.policy not in AUTO_AUGMENT_POLICIES:
            raise ValueError(f"auto augment policy must be one of {AUTO_AUGMENT_POLICIES}, got {self.policy!r}")
        fill = fill_value(self.mean).tolist()
        op = v2.TrivialAugmentWide(fill=fill) if self.policy == "trivialaugment" else v2.RandAugment(fill=fill)
        if crops.is_floating_point():   # RandomResizedCrop's bilinear output: to uint8, as a PIL crop is
            crops = crops.round().clamp_(0, 255).to(torch.uint8)
        pairs = crops.reshape(copies, -1, *crops.shape[1:])
        # The v2 ops draw from torch's global generator: a private one, seeded by the batch's key, keeps
        # the batch a pure function of (seed, epoch, rank, step) and the trainer's stream untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = torch.stack([op(pairs[:, i]) for i in range(pairs.shape[1])], 1)
        return out.reshape(crops.shape)


def auto_augment_seed(seed: int, epoch: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank, step, 0xA4]).generate_state(1)[0])
