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
