"""The numba kernels of FFCV's BackMix operation (``pipeline/ffcv.py``), compiled by FFCV's ``Compiler``:
BackMix, crop (or resized crop), flip and normalise of a batch of decoded canvases, in one pass over
the pixels, with the torch op's arithmetic (tested against it)."""
from __future__ import annotations

import numpy as np
import torch

from .augment import normalize

_KERNELS: dict = {}


def _canvas_copier():
    """The step both kernels start with: image i of the decoded HWC batch into the CHW canvas
    buffer (numba, inlined; built on first use since numba is an optional dependency)."""
    if "to_chw" not in _KERNELS:
        from numba import njit

        @njit(inline="always")
        def to_chw(images, canvas, i):
            for c in range(3):
                for y in range(images.shape[1]):
                    for x in range(images.shape[2]):
                        canvas[i, c, y, x] = images[i, y, x, c]

        _KERNELS["to_chw"] = to_chw
    return _KERNELS["to_chw"]


def normalize_table(mean, std) -> np.ndarray:
    """float32 [3, 256]: what ``normalize`` makes of each uint8 value, per channel."""
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, 3, 1, 256)
    return normalize(levels, torch.tensor(mean), torch.tensor(std)).reshape(3, 256).numpy().copy()


def compile_mix_kernel():
    """The FFCV op's kernel, compiled by FFCV's ``Compiler`` (numba; parallel over the batch).

    kernel(images, canvas, clean, mixed, partners, boxes, masks, crops, flips, lut, fill, two, mix, bh,
    bw, cell), per sample i of images uint8 [B, S, S, 3] (decoded canvases), writes
      canvas[i]: uint8 [3, S, S], the canvas;
      clean[i]: float32 [3, s, s], its crop (``crop_flip``), normalised by table ``lut``;
      mixed[i] when ``two``: the same of the canvas mixed (``mix_backgrounds``' arithmetic) when
      ``mix``, else of the canvas itself (``mixed`` is ignored without ``two``).
    For the mixed crop alone, pass one array as both clean and mixed with ``two`` off and ``mix`` on:
    each row is written clean, then its part of the box is overwritten.
    """
    from ffcv.pipeline.compiler import Compiler

    # One compiled kernel per process and threading mode: every loader shares it (no recompiling,
    # and no numba dispatcher dies with a loader while FFCV's thread may still hold it).
    key = (Compiler.is_enabled, Compiler.num_threads > 1)
    if key in _KERNELS:
        return _KERNELS[key]
    my_range = Compiler.get_iterator()
    to_chw = _canvas_copier()

    def kernel(images, canvas, clean, mixed, partners, boxes, masks, crops, flips, lut, fill, two, mix,
               bh, bw, cell):
        b, size = images.shape[0], clean.shape[2]
        for i in my_range(b):
            to_chw(images, canvas, i)
            # Output column xx reads canvas column x0 + step * xx (step -1: mirrored).
            step = -1 if flips[i] else 1
            x0 = crops[i, 1] + (size - 1 if flips[i] else 0)
            j = partners[i]
            sy, sx, dy, dx = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3]
            # The output columns whose canvas column lies in the box [dx, dx + bw).
            lo, hi = (dx - x0, dx + bw - x0) if step == 1 else (x0 - dx - bw + 1, x0 - dx + 1)
            lo, hi = max(lo, 0), min(hi, size)
            for yy in range(size):
                y = crops[i, 0] + yy
                for c in range(3):
                    if two:
                        for xx in range(size):
                            v = lut[c, images[i, y, x0 + step * xx, c]]
                            clean[i, c, yy, xx] = v
                            mixed[i, c, yy, xx] = v
                    else:
                        for xx in range(size):
                            clean[i, c, yy, xx] = lut[c, images[i, y, x0 + step * xx, c]]
                if mix and dy <= y < dy + bh:
                    # Inside the box: the partner's pixel, blanked where it is its foreground.
                    py = sy + y - dy
                    for xx in range(lo, hi):
                        px = sx + x0 + step * xx - dx
                        if masks[j, py // cell, px // cell]:
                            for c in range(3):
                                mixed[i, c, yy, xx] = lut[c, fill[c]]
                        else:
                            for c in range(3):
                                mixed[i, c, yy, xx] = lut[c, images[j, py, px, c]]
        return canvas

    kernel.is_parallel = True
    return _KERNELS.setdefault(key, Compiler.compile(kernel))


def compile_resized_crop_kernel():
    """The FFCV op's kernel for resized crops (``--augment rrc``), compiled like ``compile_mix_kernel``.

    kernel(images, canvas, clean, mixed, patch, partners, boxes, masks, y0, y1, wy, x0, x1, wx, scale,
    shift, fill, two, mix, bh, bw, cell), per sample i of images uint8 [B, S, S, 3], writes
      canvas[i]: uint8 [3, S, S], the canvas;
      patch[i] when ``mix``: uint8 [bh, bw, 3], the box the mix pastes (``mix_backgrounds``' arithmetic);
      clean[i]: float32 [3, s, s], the resized crop of the canvas (tables of ``resize_tables``, the torch
      op's arithmetic in float32), normalised as x * scale - shift (``normalize_constants``);
      mixed[i] when ``two``: the same of the mixed canvas (of the canvas itself without ``mix``).
    For the mixed crop alone, pass one array as clean and mixed with ``two`` off and ``mix`` on.
    The mixed canvas is never built: an output pixel that reads no box pixel is the clean one, and
    one that does reads the box from ``patch``.
    """
    from ffcv.pipeline.compiler import Compiler
    from numba import njit

    key = ("resized", Compiler.is_enabled, Compiler.num_threads > 1)
    if key in _KERNELS:
        return _KERNELS[key]
    my_range = Compiler.get_iterator()
    to_chw = _canvas_copier()

    @njit(inline="always")
    def mixed_pixel(images, patch, i, y, x, c, dy, dx, bh, bw):
        if dy <= y < dy + bh and dx <= x < dx + bw:
            return np.float32(patch[i, y - dy, x - dx, c])
        return np.float32(images[i, y, x, c])

    def kernel(images, canvas, clean, mixed, patch, partners, boxes, masks, y0, y1, wy, x0, x1, wx, scale,
               shift, fill, two, mix, bh, bw, cell):
        b, size = images.shape[0], clean.shape[2]
        for i in my_range(b):
            to_chw(images, canvas, i)
            j = partners[i]
            sy, sx, dy, dx = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3]
            if mix:
                for y in range(bh):
                    for x in range(bw):
                        py, px = sy + y, sx + x
                        for c in range(3):
                            patch[i, y, x, c] = fill[c] if masks[j, py // cell, px // cell] else images[j, py, px, c]
            for yy in range(size):
                ya, yb, fy = y0[i, yy], y1[i, yy], wy[i, yy]
                rows_in_box = mix and (dy <= ya < dy + bh or dy <= yb < dy + bh)
                for xx in range(size):
                    xa, xb, fx = x0[i, xx], x1[i, xx], wx[i, xx]
                    in_box = rows_in_box and (dx <= xa < dx + bw or dx <= xb < dx + bw)
                    for c in range(3):
                        # Down the rows, then across, as the torch op: the same float32 operations.
                        left = np.float32(images[i, ya, xa, c])
                        left = left + fy * (np.float32(images[i, yb, xa, c]) - left)
                        right = np.float32(images[i, ya, xb, c])
                        right = right + fy * (np.float32(images[i, yb, xb, c]) - right)
                        v = (left + fx * (right - left)) * scale[c] - shift[c]
                        if two or not mix:
                            clean[i, c, yy, xx] = v
                        if mix and in_box:
                            left = mixed_pixel(images, patch, i, ya, xa, c, dy, dx, bh, bw)
                            left = left + fy * (mixed_pixel(images, patch, i, yb, xa, c, dy, dx, bh, bw) - left)
                            right = mixed_pixel(images, patch, i, ya, xb, c, dy, dx, bh, bw)
                            right = right + fy * (mixed_pixel(images, patch, i, yb, xb, c, dy, dx, bh, bw) - right)
                            v = (left + fx * (right - left)) * scale[c] - shift[c]
                        if mix or two:
                            mixed[i, c, yy, xx] = v
        return canvas

    kernel.is_parallel = True
    return _KERNELS.setdefault(key, Compiler.compile(kernel))
