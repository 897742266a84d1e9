"""Map quality: do a cache's top-k cells (what BackMix keeps as foreground) land on the object?

Scored against a known object box per image (``digits-on-photos`` knows where it put each digit:
``backmix.osr_data.composite``). The grid covers the whole square image (``center`` canvases of a
square image are the image resized), so cell (i, j) is the image's pixels
[i*S/g, (i+1)*S/g) x [j*S/g, (j+1)*S/g). A cell counts by the share of its area inside the box.

- precision: the share of the top-k cells' area inside the box. Chance (k cells anywhere):
  box area / image area.
- recall: the share of the box's area the top-k cells cover. Chance: k / g^2.
- leak (``patch_leak``): what BackMix pastes of an image when it is the partner: the expected share
  of a box-sized patch (at a uniform place on the canvas, as the sampler draws it) that is the
  object's box left un-blanked because its cells are not in the top k. The object a "background"
  patch carries into another class's image.

Cells tied at the k-th score (every cell of generation 0 is 0.5) count by their expected share
under a random tie-break, so the score does not depend on one tie-break draw and generation 0
scores exactly chance.
"""
from __future__ import annotations

import numpy as np

from backmix.pipeline.backmix import box_size, top_k_count


def cell_overlap(boxes: np.ndarray, image_size: int, grid: int) -> np.ndarray:
    """float [N, g, g]: the share of each grid cell's area inside box (y, x, height, width)."""
    boxes = np.asarray(boxes, dtype=np.float64)
    edges = np.arange(grid + 1) * (image_size / grid)
    lo, hi = edges[:-1], edges[1:]

    def along(start: np.ndarray, length: np.ndarray) -> np.ndarray:   # [N, g] 1-D overlap shares
        inside = np.minimum(hi, (start + length)[:, None]) - np.maximum(lo, start[:, None])
        return np.clip(inside, 0, None) / (image_size / grid)

    return along(boxes[:, 0], boxes[:, 2])[:, :, None] * along(boxes[:, 1], boxes[:, 3])[:, None, :]


def top_k_weights(maps: np.ndarray, top_k_ratio: float) -> np.ndarray:
    """float [N, g, g] summing to k per map: 1 for a cell above the k-th score, 0 below it, and
    for the cells tied at it their expected share of the remaining places (random tie-break)."""
    n, g, _ = maps.shape
    flat = np.asarray(maps, dtype=np.float32).reshape(n, g * g)
    k = top_k_count(g * g, top_k_ratio)
    kth = -np.sort(-flat, axis=1)[:, k - 1:k]                    # [N, 1] the k-th highest score
    above, tied = flat > kth, flat == kth
    places = k - above.sum(axis=1, keepdims=True)                 # places left for the tied cells
    weights = above + tied * (places / tied.sum(axis=1, keepdims=True))
    return weights.reshape(n, g, g)


def score_maps(maps: np.ndarray, boxes: np.ndarray, image_size: int, top_k_ratio: float) -> dict:
    """Per-image precision and recall of the top-k cells against the boxes, and their chance values."""
    n, g, _ = maps.shape
    k = top_k_count(g * g, top_k_ratio)
    overlap = cell_overlap(boxes, image_size, g)
    inside = (top_k_weights(maps, top_k_ratio) * overlap).sum(axis=(1, 2))   # top-k cells' area in the box, in cells
    box_cells = overlap.sum(axis=(1, 2))                                     # the box's area, in cells
    return {"precision": inside / k, "recall": inside / box_cells,
            "chance_precision": box_cells / (g * g), "chance_recall": np.full(n, k / (g * g))}


def patch_leak(maps: np.ndarray, boxes: np.ndarray, image_size: int, canvas: int, box_fraction: float,
               top_k_ratio: float) -> np.ndarray:
    """float [N]: the expected share of a pasted patch (``box_fraction`` of the canvas side, at a
    uniform top-left corner) that is the image's object box outside its top-k cells."""
    n, g, _ = maps.shape
    if canvas % g:
        raise ValueError(f"canvas {canvas} is not a multiple of the grid {g}")
    # Per canvas pixel: its share inside the object box, and the share of it BackMix leaves un-blanked.
    scaled = np.asarray(boxes, dtype=np.float64) * (canvas / image_size)
    on_object = cell_overlap(scaled, canvas, canvas)
    kept = np.repeat(np.repeat(1.0 - top_k_weights(maps, top_k_ratio), canvas // g, axis=1), canvas // g, axis=2)
    leak = np.pad(on_object * kept, ((0, 0), (1, 0), (1, 0))).cumsum(axis=1).cumsum(axis=2)
    bh, bw = box_size((canvas, canvas), box_fraction)
    # Every patch's sum from the integral image, for each corner the sampler can draw.
    sums = leak[:, bh:, bw:] - leak[:, :-bh, bw:] - leak[:, bh:, :-bw] + leak[:, :-bh, :-bw]
    return sums.mean(axis=(1, 2)) / (bh * bw)
