"""The BackMix mix: the one implementation, a pure batched function on tensors.

Every loader either calls these functions or expresses the same arithmetic in
its own ops, and tests hold each loader to them. They run on whatever device
their inputs live on; there is no loop over samples.

Terms, for a batch of B canvases of size H x W and a g x g foreground grid:
- ``maps``: soft foreground maps S, float [B, g, g], one per batch image.
- ``tie_break``: a permutation of the g*g cells per image, int64 [B, g*g]; among
  cells of equal score the one earlier in it ranks higher. At generation 0 every
  cell is 0.5, so this is what picks the "foreground" then.
- ``masks``: the top-k cells of each map, bool [B, g, g] (True = foreground).
- ``partners``: int64 [B]; target i takes its patch from image partners[i].
- ``boxes``: int64 [B, 4] = (src_y, src_x, dst_y, dst_x) top-left corners of the
  box in the partner and in the target; the box size is fixed per batch.
"""
from __future__ import annotations

import torch
from torch import Tensor


def top_k_count(cells: int, top_k_ratio: float) -> int:
    """How many of a map's ``cells`` are foreground: ``round(top_k_ratio * cells)``, at least 1."""
    return max(1, int(round(top_k_ratio * cells)))


def top_k_mask(maps: Tensor, top_k_ratio: float, tie_break: Tensor) -> Tensor:
    """bool [B, g, g]: the ``round(top_k_ratio * g * g)`` highest cells of each map."""
    b, g, _ = maps.shape
    n = g * g
    k = top_k_count(n, top_k_ratio)
    scores = maps.reshape(b, n).gather(1, tie_break)
    # A stable sort keeps tie_break's order among equal scores: that is the tie rule.
    ranked = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    cells = tie_break.gather(1, ranked)
    mask = torch.zeros(b, n, dtype=torch.bool, device=maps.device)
    return mask.scatter_(1, cells, True).reshape(b, g, g)


def box_size(canvas_hw: tuple[int, int], box_fraction: float) -> tuple[int, int]:
    h, w = canvas_hw
    return max(1, int(round(box_fraction * h))), max(1, int(round(box_fraction * w)))


def mix_backgrounds(images: Tensor, partners: Tensor, masks: Tensor, boxes: Tensor,
                    box_hw: tuple[int, int], fill: Tensor) -> Tensor:
    """Paste a box of each partner's background into its target.

    images: [B, C, H, W] (any dtype); partners: int64 [B]; masks: bool [B, g, g]
    (foreground of each batch image, H and W multiples of g); boxes: int64 [B, 4];
    fill: [C], the blank value (the normalisation mean, so 0 after normalising).
    Returns a new tensor; pixels outside each target's box are untouched.
    """
    b, c, h, w = images.shape
    if b < 2:  # a lone image has no partner; it stays as it is
        return images.clone()
    g = masks.shape[-1]
    bh, bw = box_hw
    dev = images.device
    ry = torch.arange(bh, device=dev)
    rx = torch.arange(bw, device=dev)
    src_y = (boxes[:, 0:1] + ry)[:, :, None]          # [B, bh, 1]
    src_x = (boxes[:, 1:2] + rx)[:, None, :]          # [B, 1, bw]
    dst_y = (boxes[:, 2:3] + ry)[:, :, None]
    dst_x = (boxes[:, 3:4] + rx)[:, None, :]
    j = partners[:, None, None]
    patch = images[j, :, src_y, src_x]                  # [B, bh, bw, C]
    # Nearest upsampling of the g x g mask: pixel y lies in cell y // (H / g).
    foreground = masks[j, src_y // (h // g), src_x // (w // g)]   # [B, bh, bw]
    patch = torch.where(foreground[..., None], fill.to(images.dtype), patch)
    out = images.clone()
    out[torch.arange(b, device=dev)[:, None, None], :, dst_y, dst_x] = patch
    return out


def backmix(images: Tensor, maps: Tensor, partners: Tensor, tie_break: Tensor, boxes: Tensor,
            *, top_k_ratio: float, box_hw: tuple[int, int], fill: Tensor) -> Tensor:
    """Soft maps in, mixed images out: ``top_k_mask`` then ``mix_backgrounds``."""
    return mix_backgrounds(images, partners, top_k_mask(maps, top_k_ratio, tie_break), boxes, box_hw, fill)


def stretched_span(starts: Tensor, length: int, sizes: Tensor, canvas: int) -> tuple[Tensor, Tensor]:
    """(first, end) int64 [B]: the pixels of an image ``sizes`` [B] long that the canvas pixels
    starts .. starts + length - 1 of its stretched canvas (``canvas`` long) cover; at least one."""
    first = starts * sizes // canvas
    return first, torch.maximum((starts + length) * sizes // canvas, first + 1)


def mix_image_backgrounds(images: Tensor, sizes: Tensor, partners: Tensor, masks: Tensor, boxes: Tensor,
                          box_hw: tuple[int, int], canvas: int, fill: Tensor) -> Tensor:
    """``mix_backgrounds`` in each image's own pixels, for crops cut from the whole image.

    images: [B, C, H, W], image i at the top left, ``sizes[i]`` = (height, width) of it (int64 [B, 2], on
    the images' device); the rest is never read. The grid and the boxes (``boxes``, ``box_hw``: in
    ``canvas`` pixels) live on each image's stretched canvas, as a stretched canvas's grid covers the
    whole image: the target's box covers the pixels of the target its canvas box covers
    (``stretched_span``), and each of them takes the nearest pixel of the partner's box (the one
    under its centre), blank where that pixel's grid cell of the partner is foreground."""
    b = images.shape[0]
    if b < 2:  # a lone image has no partner; it stays as it is
        return images.clone()
    g, (bh, bw), dev = masks.shape[-1], box_hw, images.device
    j = partners
    height, width = sizes[:, 0], sizes[:, 1]
    ty0, ty1 = stretched_span(boxes[:, 2], bh, height, canvas)
    tx0, tx1 = stretched_span(boxes[:, 3], bw, width, canvas)
    sy0, sy1 = stretched_span(boxes[:, 0], bh, height[j], canvas)
    sx0, sx1 = stretched_span(boxes[:, 1], bw, width[j], canvas)
    th, tw = ty1 - ty0, tx1 - tx0
    ry = torch.arange(int(th.max()), device=dev)[None, :]              # [1, R]
    rx = torch.arange(int(tw.max()), device=dev)[None, :]              # [1, Q]
    # The partner pixel under the centre of target pixel r of n: first + floor((r + 1/2) * m / n).
    src_y = torch.minimum(sy0[:, None] + (2 * ry + 1) * (sy1 - sy0)[:, None] // (2 * th[:, None]), sy1[:, None] - 1)
    src_x = torch.minimum(sx0[:, None] + (2 * rx + 1) * (sx1 - sx0)[:, None] // (2 * tw[:, None]), sx1[:, None] - 1)
    jj = j[:, None, None]
    patch = images[jj, :, src_y[:, :, None], src_x[:, None, :]]                       # [B, R, Q, C]
    cell_y = (src_y * g // height[j][:, None])[:, :, None]
    cell_x = (src_x * g // width[j][:, None])[:, None, :]
    patch = torch.where(masks[jj, cell_y, cell_x][..., None], fill.to(images.dtype), patch)
    inside = (ry[:, :, None] < th[:, None, None]) & (rx[:, None, :] < tw[:, None, None])  # [B, R, Q]
    i, y, x = inside.nonzero(as_tuple=True)
    out = images.clone()
    out[i, :, ty0[i] + y, tx0[i] + x] = patch[i, y, x]
    return out
