"""The DALI backend's two graphs: what each batch's host inputs are (``inputs``: the batch's params and
masks from ``LoaderView.inputs``, and the geometry, as numpy arrays, one batch each) and the DALI ops that
make its outputs from them (``outputs``). ``DaliSource`` builds one pipeline of one graph, chosen by ``choose_graph``:

- ``CanvasGraph`` whenever canvases are made (batches carry them, or an in-loop rebuild reads them) and
  the crops are cut from the canvas: each file is decoded and resized to its canvas once, the mix and
  the crops work on the canvas. Given DALI's canvases, its output is the reference's arithmetic exactly
  (crop_mirror_normalize's float rounding aside).
- ``RegionGraph`` otherwise: no canvas is made for the crops. A box on the canvas is a region of the
  image (the canvas is a scaled square of it), so each image decodes one region, the smallest holding
  its crop's box and (with BackMix) the rectangle it lends, and resizes each once; crops cut from the
  image (``LoaderConfig.crops_images``) are such regions too. When canvases are wanted as well, each
  file is decoded whole once and the regions are sliced from it.

The mix (target i borrows from partner j = partners[i]) in both: each image j cuts what it lends from
its own pixels (box-sized work), ``permute_batch`` hands it to its borrower and ``multi_paste`` lays it
over the target. The lender's foreground in it is blanked: on the canvas by a blend with its mask
before the hand-over, exactly as the kernel; in the region graph by pasting the fill over each
foreground cell's rectangle after it (the same pixels, as the nearest cell under each pixel's centre
is a rectangle of pixels per cell, without a per-pixel pass). A batch of one is left as it is, as the
kernel."""
from __future__ import annotations

import numpy as np
import torch

from .augment import fill_value
from .backmix import stretched_span
from .config import LoaderConfig
from .dali_ops import (batch_of, box_regions, canvas_rois, crop_normalize, crop_where, decode_regions, decode_to_canvas,
                       decode_whole)


def choose_graph(config: LoaderConfig, box_hw: tuple, gpu: bool, with_canvas: bool):
    """The graph of a pipeline whose batches carry the canvas (``with_canvas``) or not."""
    graph = CanvasGraph if with_canvas and not config.crops_images else RegionGraph
    return graph(config, box_hw, gpu, with_canvas)


class _Graph:
    def __init__(self, config: LoaderConfig, box_hw: tuple, gpu: bool, with_canvas: bool) -> None:
        self.config, self.box_hw, self.gpu, self.with_canvas = config, tuple(box_hw), gpu, with_canvas
        self.fill_rgb = fill_value(config.mean).numpy().reshape(1, 1, 3)

    def n_inputs(self) -> int:
        return len(self.layout())


class CanvasGraph(_Graph):
    """Decode, canvas, mix on the canvas, crop (``crop_normalize``)."""

    def blank(self, lent, fg):
        """DALI ops: uint8 pixels ``lent`` with the foreground ``fg`` (uint8 0/1, same H, W) set to the fill."""
        from nvidia.dali import types

        fill = types.Constant(self.fill_rgb, dtype=types.UINT8, device="gpu" if self.gpu else "cpu")
        # uint8 arithmetic wraps (mod 256), so lent - (lent - fill) is fill exactly: one product, not two.
        return lent - (lent - fill) * fg

    def layout(self) -> list:
        return [""] * 5 + (["HWC", "", "", ""] if self.config.backmix else [])

    def inputs(self, p, masks: np.ndarray, sizes: np.ndarray) -> tuple:
        """flips, the crops' places (``crop_where``), the canvases' image regions (``canvas_rois``); with
        BackMix the masks, partners, each image's lent box corner (its borrower's source corner) and the
        two pastes' corners (canvas, then the box). ``sizes``: int [B, 2], each image's stored size."""
        cfg = self.config
        b = len(p.partners)
        out = (batch_of(p.flips.astype(np.int32)),) + crop_where(p, cfg) + canvas_rois(sizes, cfg.canvas, cfg.canvas_mode)
        if not cfg.backmix:
            return out
        src, dst = p.boxes[:, 0:2], p.boxes[:, 2:4]
        if b < 2:
            dst = src   # as the kernel, a lone image is left as it is: its own box pasted back in place
        lend_at = np.empty_like(src)
        lend_at[p.partners] = src
        out_anchors = np.zeros((b, 2, 2), dtype=np.int32)
        out_anchors[:, 1] = dst
        return out + (batch_of(masks.astype(np.uint8)[..., None]), batch_of(p.partners.astype(np.int32)),
                      batch_of(lend_at.astype(np.int32)), batch_of(out_anchors))

    def outputs(self, files, inputs) -> tuple:
        from nvidia.dali import fn, types

        cfg, (bh, bw) = self.config, self.box_hw
        s = cfg.canvas
        flips, *where = inputs[0:3]
        canvas = decode_to_canvas(files, s, self.gpu, inputs[3:5])
        outs = [fn.transpose(canvas, perm=[2, 0, 1])] if self.with_canvas else []
        if cfg.clean:
            outs.append(crop_normalize(canvas, flips, where, cfg))
        if cfg.backmix:
            masks, partners, lend_at, out_anchors = inputs[5:]
            if self.gpu:
                masks = masks.gpu()
            # The lent box of the nearest-upsampled mask, sampled straight from the g x g grid: box
            # pixel (y, x) reads cell floor((corner + (y, x) + 0.5) / cell), as the full resize would.
            cell = s // cfg.grid
            corner = fn.cast(lend_at, dtype=types.FLOAT) / float(cell)
            box_cells = types.Constant(np.array([bh / cell, bw / cell], dtype=np.float32))
            fg = fn.resize(masks, size=[bh, bw], roi_start=corner, roi_end=corner + box_cells,
                           interp_type=types.INTERP_NN, antialias=False)
            rgb = fn.slice(canvas, lend_at, [bh, bw], axis_names="HW")
            lent = fn.permute_batch(self.blank(rgb, fg), indices=partners)
            shapes = types.Constant(np.array([[s, s], [bh, bw]], dtype=np.int32))   # the canvas, then the box
            mixed = fn.multi_paste(canvas, lent, shapes=shapes, out_anchors=out_anchors, output_size=[s, s])
            outs.append(crop_normalize(mixed, flips, where, cfg))
        return tuple(outs)


class RegionGraph(_Graph):
    """Each crop, with the rectangle its image lends, from one region of its image, each resized once
    (``box_regions``, ``decode_regions``)."""

    def layout(self) -> list:
        cfg = self.config
        return [""] * (5 + 2 * cfg.backmix + 2 * self.with_canvas + 4 * cfg.backmix)

    def inputs(self, p, masks: np.ndarray, sizes: np.ndarray) -> tuple:
        """flips; the region of each image to decode and where its crop (and, with BackMix, what it
        lends: ``lend_boxes``) lies in it (``box_regions``); the canvases' image regions when the
        canvas is made; with BackMix the rest of ``lend_boxes``. ``sizes``: int [B, 2], each image's
        stored size."""
        cfg, box_hw = self.config, self.box_hw
        mode = "image" if cfg.crops_images else cfg.canvas_mode   # where the crop boxes are
        crop_box = np.concatenate([p.crops, p.crop_sizes], axis=1)
        canvas = canvas_rois(sizes, cfg.canvas, cfg.canvas_mode) if self.with_canvas else ()
        flips = (batch_of(p.flips.astype(np.int32)),)
        if not cfg.backmix:
            return flips + box_regions(sizes, [(crop_box, cfg.crop)], cfg.canvas, mode) + canvas
        src, dst = p.boxes[:, 0:2], p.boxes[:, 2:4]
        if not cfg.crops_images:   # the box on the canvases; the partner's grid cells are canvas // grid pixels
            cells = np.full((len(p.partners), 2), 1.0 / (cfg.canvas // cfg.grid))
            spans = (dst, dst + box_hw, src, src + box_hw)
        else:                      # the box in the images' pixels their stretched canvases' box covers (``stretched_span``)
            theirs = sizes[p.partners]
            cells = cfg.grid / theirs
            spans = image_spans(p.boxes, box_hw, sizes, theirs, cfg.canvas)
        partners, lend_box, shown, *pastes = lend_boxes(p, masks, cfg.crop, spans, cells, self.rects())
        where = box_regions(sizes, [(crop_box, cfg.crop), (lend_box, shown)], cfg.canvas, mode)
        return flips + where + canvas + (partners, shown, *pastes)

    def rects(self) -> int:
        """Grid cells a pasted rectangle covers per axis, at most: its box's extent in cells (on the
        canvas, or on a stretched canvas) and two partly covered ones."""
        cfg = self.config
        return int(np.ceil(max(self.box_hw) * cfg.grid / cfg.canvas)) + 2

    def outputs(self, files, inputs) -> tuple:
        from nvidia.dali import fn, types

        cfg, gpu = self.config, self.gpu
        c = cfg.crop
        norm = {"mean": [255.0 * m for m in cfg.mean], "std": [255.0 * v for v in cfg.std],
                "dtype": types.FLOAT, "output_layout": "CHW"}
        flips, region = inputs[0], inputs[1:3]
        spans = [(inputs[3], inputs[4], c)]
        k = 5
        if cfg.backmix:
            k += 2
        outs, images = [], None
        if self.with_canvas:   # decoded whole once: the canvas and the regions come from that decode
            images = decode_whole(files, gpu)
            outs.append(fn.transpose(decode_to_canvas(files, cfg.canvas, gpu, inputs[k:k + 2], images), perm=[2, 0, 1]))
            k += 2
        if not cfg.backmix:
            clean = decode_regions(files, region, spans, gpu, images)[0]
            outs.append(fn.crop_mirror_normalize(clean, mirror=flips, **norm))
            return tuple(outs)
        partners, shown, paste_shapes, out_anchors = inputs[k:]
        clean, lent = decode_regions(files, region, spans + [(inputs[5], inputs[6], shown)], gpu, images)
        if cfg.clean:
            outs.append(fn.crop_mirror_normalize(clean, mirror=flips, **norm))
        lent = fn.permute_batch(lent, indices=partners)
        # The lender's foreground under the rectangle is blanked by pasting the fill over it, one
        # rectangle a cell: cheaper than a per-pixel blend, whose arithmetic reads the whole rectangle.
        fill = fn.constant(idata=np.broadcast_to(self.fill_rgb, (c, c, 3)).ravel().tolist(), shape=[c, c, 3],
                           dtype=types.UINT8, device="gpu" if gpu else "cpu")
        fills = [fill] * self.rects() ** 2
        mixed = fn.multi_paste(clean, lent, *fills, shapes=paste_shapes, out_anchors=out_anchors, output_size=[c, c])
        outs.append(fn.crop_mirror_normalize(mixed, mirror=flips, **norm))
        return tuple(outs)


def image_spans(boxes: np.ndarray, box_hw: tuple, sizes: np.ndarray, theirs: np.ndarray, canvas: int) -> tuple:
    """(t0, t1, s0, s1), int [B, 2]: the pixels of each target (sizes) and of its partner (theirs) that the
    target and source boxes on their stretched canvases cover, as ``mix_image_backgrounds`` pastes them."""
    bhw = torch.tensor(box_hw)

    def span(corners, hw):
        first, end = stretched_span(torch.from_numpy(corners), bhw, torch.from_numpy(hw), canvas)
        return first.numpy(), end.numpy()

    t0, t1 = span(boxes[:, 2:4], sizes)
    s0, s1 = span(boxes[:, 0:2], theirs)
    return t0, t1, s0, s1


def lend_boxes(p, masks: np.ndarray, crop: int, spans: tuple, cells: np.ndarray, rects: int) -> tuple:
    """What the mixed crop of target i takes from its partner j = partners[i], as DALI inputs.

    ``spans`` (t0, t1, s0, s1; [B, 2] each, y and x): the pasted box's pixels [t0, t1) in the target
    (where its crop is: the canvas, or the image) and the pixels [s0, s1) of the partner they show,
    stretched onto them. ``cells``: float [B, 2], grid cells per partner pixel. Crop pixel u shows the
    pixel under its centre, cy + (u + 1/2) h / crop (the nearest; the reference's linear resize blends
    it with its neighbour): those in [t0, t1) form the rectangle [u0, u1) x [v0, v1) of the crop, which
    shows the partner's pixels there. Returned: partners (int32); in lender order (entry j for the
    target that borrows from image j, so that each image cuts from its own pixels and the small lent
    rectangles are what is permuted), that rectangle's extent in the lender (float32 [4]: y, x, height,
    width; the only part of it read) and its size (float32 [2], at least 1: what it is resized to); then,
    in target order, the pastes (shapes and corners, int32 [2 + rects ** 2, 2]; an empty one pastes
    nothing): the crop, the rectangle, then the fill over each of the lender's foreground cells in it
    (``foreground_rects``; ``masks``: bool-like [B, g, g], each image's top-k cells; ``rects``: cells per
    axis a rectangle covers at most). A batch of one is not mixed, as the kernel."""
    b = len(p.partners)
    corner, size = p.crops.astype(np.float64), p.crop_sizes.astype(np.float64)
    t0, t1, s0, s1 = (np.asarray(a, dtype=np.float64) for a in spans)
    step = size / crop   # pixels per crop pixel
    first = np.clip(np.ceil((t0 - corner) / step - 0.5), 0, crop).astype(np.int64)
    end = np.clip(np.ceil((t1 - corner) / step - 0.5), 0, crop).astype(np.int64)
    shown = (end - first).clip(0)
    if b < 2:
        shown[:] = 0
    empty = (shown == 0).any(axis=1, keepdims=True)
    shown = np.where(empty, 0, shown)
    # In the partner: the rectangle's extent (within half a crop pixel of the source box); any region
    # of it when empty (nothing of it is pasted, but DALI resizes something).
    ratio = (s1 - s0) / (t1 - t0)
    at = np.where(empty, s0, s0 + (corner + first * step - t0) * ratio)
    extent = np.where(empty, 1.0, shown * step * ratio)
    shapes = np.zeros((b, 2, 2), dtype=np.int32)
    shapes[:, 0], shapes[:, 1] = crop, shown
    anchors = np.zeros((b, 2, 2), dtype=np.int32)
    anchors[:, 1] = np.where(empty, 0, first)
    # The lender's foreground cells over the pasted rectangle, as fill pastes after it.
    fill_shapes, fill_at = foreground_rects(at * cells, (at + extent) * cells, shown, masks[p.partners].astype(bool),
                                            rects)
    shapes = np.concatenate([shapes, fill_shapes], axis=1)
    anchors = np.concatenate([anchors, np.where(fill_shapes.all(axis=2, keepdims=True),
                                                fill_at + anchors[:, 1:2], 0)], axis=1).astype(np.int32)
    lender = np.argsort(p.partners)   # the target that borrows from each image (partners is a permutation)
    f32 = lambda a: np.ascontiguousarray(a[lender], dtype=np.float32)   # noqa: E731
    return (batch_of(p.partners.astype(np.int32)), f32(np.concatenate([at, extent], axis=1)), f32(shown.clip(1)),
            batch_of(shapes), batch_of(anchors))


def foreground_rects(c0: np.ndarray, c1: np.ndarray, shown: np.ndarray, fg: np.ndarray, rects: int) -> tuple:
    """Where a pasted rectangle shows its lender's foreground: the rectangle's pixel (u, v) (of ``shown``,
    int [B, 2]) shows the grid cell under its centre, floor(c0 + (u + 1/2) (c1 - c0) / shown) per axis
    (c0, c1: float [B, 2], the rectangle's extent in the lender's cells; a cell off the grid is its edge
    cell, as a nearest resize of the grid clamps), so each cell's pixels are a rectangle. ``fg``: bool
    [B, g, g], the lender's foreground. Returned: int32 [B, rects ** 2, 2] shapes and corners in the
    pasted rectangle of the cells it covers that are foreground, for ``rects`` cells per axis (at
    least those it covers); zero shapes for the rest."""
    g = fg.shape[1]
    first, size = [], []
    for axis in (0, 1):
        a0, a1, n = c0[:, axis:axis + 1], c1[:, axis:axis + 1], shown[:, axis:axis + 1]
        cell = np.clip(np.floor(a0), 0, g - 1).astype(np.int64) + np.arange(rects)
        per_pixel = (a1 - a0) / np.maximum(n, 1)
        u0 = np.where(cell <= 0, 0, np.ceil((cell - a0) / per_pixel - 0.5))
        u1 = np.where(cell >= g - 1, n, np.ceil((cell + 1 - a0) / per_pixel - 0.5))
        u0 = np.clip(u0, 0, n)
        u1 = np.clip(u1, u0, n)
        size.append(np.where(cell < g, u1 - u0, 0))
        first.append((u0, np.minimum(cell, g - 1)))
    (y0, ry), (x0, rx) = first
    on = fg[np.arange(len(fg))[:, None, None], ry[:, :, None], rx[:, None, :]]
    h, w = (size[0][:, :, None] * on), (size[1][:, None, :] * on)
    shapes = np.stack(np.broadcast_arrays(h, w), axis=-1).reshape(len(fg), -1, 2)
    corners = np.stack(np.broadcast_arrays(y0[:, :, None], x0[:, None, :]), axis=-1).reshape(len(fg), -1, 2)
    return shapes.astype(np.int32), corners.astype(np.int32)
