"""The numba kernels of FFCV's BackMix operation (``pipeline/ffcv.py``), compiled by FFCV's ``Compiler``:
BackMix, crop (or resized crop), flip and normalise of a batch of decoded canvases, in one pass over
the pixels, with the torch op's arithmetic (tested against it)."""
from __future__ import annotations

import numpy as np
import torch

from backmix.osr_data.normalize import normalize

_KERNELS: dict = {}


def _table_maker():
    """``resize_sources`` of one span, in numba: fills (lo, hi, weight) [size] for a span of ``length``
    pixels from ``start`` resized to ``size`` (read backwards when ``mirrored``), in the same float32
    operations, bit for bit (tests/test_ffcv.py), given ``scale``, float32(length) / float32(size)
    (``span_scales``: divided outside the kernel, whose fastmath turns a division into a reciprocal). The kernel makes its tables itself: torch's ops on [B, size] tables, run on FFCV's
    thread beside numba's, cost more than the kernel's pixels."""
    if "tables" not in _KERNELS:
        from numba import njit

        half, zero = np.float32(0.5), np.float32(0.0)

        @njit(inline="always")
        def spans(start, length, scale, size, mirrored, lo, hi, weight):
            last = np.float32(length - 1)
            for k in range(size):
                pos = min(max((np.float32(k) + half) * scale - half, zero), last)
                low = np.floor(pos)
                at = size - 1 - k if mirrored else k
                weight[at] = pos - low
                lo[at] = start + np.int64(low)
                hi[at] = start + min(np.int64(low) + 1, length - 1)

        _KERNELS["tables"] = spans
    return _KERNELS["tables"]


def span_scales(crop_sizes: np.ndarray, size: int) -> np.ndarray:
    """float32 [B, 2]: what ``resize_sources`` scales each crop's rows and columns by."""
    return crop_sizes.astype(np.float32) / np.float32(size)


def _compiled(kernel):
    """``kernel`` compiled by FFCV's ``Compiler`` (numba with fastmath, GIL released, parallel over the
    batch when FFCV runs more than one thread; plain Python when FFCV's compiler is off)."""
    from ffcv.pipeline.compiler import Compiler

    kernel.is_parallel = True
    return Compiler.compile(kernel)


def normalize_table(mean, std) -> np.ndarray:
    """float32 [3, 256]: what ``normalize`` makes of each uint8 value, per channel."""
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, 3, 1, 256)
    return normalize(levels, torch.tensor(mean), torch.tensor(std)).reshape(3, 256).numpy().copy()


def compile_mix_kernel():
    """The FFCV op's kernel (numba; parallel over the batch, ``_compiled``).

    kernel(images, clean, mixed, partners, boxes, masks, crops, flips, lut, fill, two, mix, bh, bw, cell),
    per sample i of images uint8 [B, S, S, 3] (decoded canvases), writes
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

    def kernel(images, clean, mixed, partners, boxes, masks, crops, flips, lut, fill, two, mix, bh, bw, cell):
        b, size = partners.shape[0], clean.shape[2]   # the batch (FFCV may hand a full slot of images)
        for i in my_range(b):
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

    return _KERNELS.setdefault(key, _compiled(kernel))


def resize_scratch(canvas: int, crop: int) -> list[tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) per sample of the resized-crop kernel's scratch buffers (its docstring)."""
    return [((2, canvas * 3), np.dtype("f4")), ((2, canvas * 3), np.dtype("u1")),
            ((4, crop), np.dtype("i8")), ((2, crop), np.dtype("f4"))]


def compile_resized_crop_kernel():
    """The FFCV op's kernel for resized crops (``--augment rrc``), compiled like ``compile_mix_kernel``.

    kernel(pixels, clean, mixed, patch, blends, box_rows, sources, weights, partners, boxes, masks, crops,
    crop_sizes, scales, flips, scale, shift, fill, two, mix, bh, bw, cell), per sample i of pixels uint8
    [B, S, S * 3] (the decoded canvases, each row flat), writes
      patch[i] when ``mix``: uint8 [bh, bw, 3], the box the mix pastes (``mix_backgrounds``' arithmetic);
      clean[i]: float32 [3, s, s], the resized crop of the canvas (the tables ``resize_tables`` makes of
      crops, crop_sizes and flips; the torch op's arithmetic in float32), normalised as x * scale -
      shift (``normalize_constants``);
      mixed[i] when ``two``: the same of the mixed canvas (of the canvas itself without ``mix``).
    For the mixed crop alone, pass one array as clean and mixed with ``two`` off and ``mix`` on.
    Scratch, per sample (``resize_scratch``, declared to FFCV as the op's buffers; nothing is allocated in
    the parallel loop): blends float32 [2, S * 3], box_rows uint8 [2, S * 3], sources int64 [4, s] (y0,
    y1, x0, x1), weights float32 [2, s] (wy, wx).
    Separable, as the torch op: each output row first blends its two source rows over the box's
    columns (once per column, not once per output pixel), then each output pixel blends two of those;
    the same float32 operations in the same order, so the values are the torch op's. The mixed canvas
    is never built: a blended row that reads no box pixel is the clean one, and one that does reads
    the box from ``patch``.
    """
    from ffcv.pipeline.compiler import Compiler
    from numba import njit

    key = ("resized", Compiler.is_enabled, Compiler.num_threads > 1)
    if key in _KERNELS:
        return _KERNELS[key]
    my_range = Compiler.get_iterator()
    spans = _table_maker()

    @njit(inline="always")
    def mixed_row(pixels, patch, i, y, dy, dx, bh, start, stop, row):
        # Columns [start, stop) (inside the box's) of the mixed canvas's row y, into row (flat HWC).
        for x in range(start, stop):
            for c in range(3):
                row[x * 3 + c] = patch[i, y - dy, x - dx, c] if dy <= y < dy + bh else pixels[i, y, x * 3 + c]

    @njit(inline="always")
    def across(blended, out, i, yy, x0, x1, wx, scale, shift, start, stop):
        # Output row yy of image i, columns [start, stop): each pixel blends two columns of the row's
        # blended source rows (``blended``: [column * 3 + channel]).
        for c in range(3):
            sc, sh = scale[c], shift[c]
            for xx in range(start, stop):
                left = blended[x0[xx] * 3 + c]
                out[i, c, yy, xx] = (left + wx[xx] * (blended[x1[xx] * 3 + c] - left)) * sc - sh

    @njit(inline="always")
    def down(top, bottom, fy, blended, start, stop):
        # Blend two source rows (HWC rows, flat) over [start, stop): one run of values, vectorised.
        for t in range(start, stop):
            a = np.float32(top[t])
            blended[t] = a + fy * (np.float32(bottom[t]) - a)

    def kernel(pixels, clean, mixed, patch, blends, box_rows, sources, weights, partners, boxes, masks, crops,
               crop_sizes, scales, flips, scale, shift, fill, two, mix, bh, bw, cell):
        b, size = partners.shape[0], clean.shape[2]   # FFCV may hand a full slot
        for i in my_range(b):
            # This image's tables (``resize_tables``): the source rows and columns of each output pixel.
            y0, y1, x0, x1 = sources[i, 0], sources[i, 1], sources[i, 2], sources[i, 3]
            wy, wx = weights[i, 0], weights[i, 1]
            spans(crops[i, 0], crop_sizes[i, 0], scales[i, 0], size, False, y0, y1, wy)
            spans(crops[i, 1], crop_sizes[i, 1], scales[i, 1], size, flips[i], x0, x1, wx)
            j = partners[i]
            sy, sx, dy, dx = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3]
            # The output columns that read a box column: one run [first, last] (the tables are monotone).
            first, last = size, -1
            if mix:
                for y in range(bh):
                    for x in range(bw):
                        py, px = sy + y, sx + x
                        for c in range(3):
                            patch[i, y, x, c] = fill[c] if masks[j, py // cell, px // cell] else pixels[j, py, px * 3 + c]
                for xx in range(size):
                    if dx <= x0[xx] < dx + bw or dx <= x1[xx] < dx + bw:
                        first, last = min(first, xx), max(last, xx)
            # The canvas columns the crop reads (mirrored or not, the tables' first and last entries).
            lo = min(x0[0], x0[size - 1])
            hi = max(x1[0], x1[size - 1]) + 1
            rows, boxed = blends[i, 0], blends[i, 1]              # the clean and the mixed canvas's rows, blended
            top_row, bottom_row = box_rows[i, 0], box_rows[i, 1]  # the mixed canvas's two source rows
            # Without ``two`` the crop asked for is in ``mixed`` when mixing (one array for both).
            out = clean if two or not mix else mixed
            for yy in range(size):
                ya, yb, fy = y0[yy], y1[yy], wy[yy]
                down(pixels[i, ya], pixels[i, yb], fy, rows, lo * 3, hi * 3)
                across(rows, out, i, yy, x0, x1, wx, scale, shift, 0, size)
                if two:   # the mixed row starts as the clean one (loops: numba's slice copy allocates)
                    for c in range(3):
                        for xx in range(size):
                            mixed[i, c, yy, xx] = clean[i, c, yy, xx]
                if mix and first <= last and (dy <= ya < dy + bh or dy <= yb < dy + bh):
                    # Rows that read the box: blend the mixed canvas's box columns, redo the columns reading them.
                    for t in range(lo * 3, hi * 3):
                        boxed[t] = rows[t]
                    xs, xe = max(lo, dx), min(hi, dx + bw)
                    mixed_row(pixels, patch, i, ya, dy, dx, bh, xs, xe, top_row)
                    mixed_row(pixels, patch, i, yb, dy, dx, bh, xs, xe, bottom_row)
                    down(top_row, bottom_row, fy, boxed, xs * 3, xe * 3)
                    across(boxed, mixed, i, yy, x0, x1, wx, scale, shift, first, last + 1)

    return _KERNELS.setdefault(key, _compiled(kernel))
