"""The FFCV loader: a .beton in, the common ``BackMixBatch`` stream out.

Canvases. A beton written at the canvas size (``write-beton --canvas S``, what
the loader looks for by default; it never writes one itself) is decoded as is; in "raw" mode those
canvases are the reference loader's bit for bit. A beton of other sizes
(``--max-resolution``) is decoded and resized to S x S by FFCV (OpenCV's
resize: close to, not equal to, torchvision's).

Order. FFCV's loader is built in sequential order over our rows and its
traversal order is replaced by ours (``EpochSampler``'s batches, flattened),
so FFCV cuts exactly our batches.

Mix. On the CPU the mix is an FFCV ``Operation`` after the decoder, whose
kernel FFCV's ``Compiler`` compiles with numba (parallel over the batch, GIL
released, on FFCV's own thread, ahead of the training loop). The operation
finds its batch's step from the sample indices FFCV hands it (batches run on
a background thread, so call order means nothing), draws that step's params
from the shared ``BackMixSampler``, takes the top-k masks of the current maps
and writes one buffer per batch: the canvases (uint8 CHW), then the crop/flip/
normalised clean and mixed images (float32; each only when asked for), which the batch's tensors view
with no copy on the training loop's thread (the buffer is reused only once they
are gone). Normalising is a lookup in a table made by
``pipeline.augment.normalize`` itself, so the floats are the torch op's bit for
bit. With ``--augment rrc`` a second kernel resamples the clean and mixed
canvases through the torch op's own tables (``resize_tables``): its float32
arithmetic, to 1e-5. The beton stores
each sample's canvas mode; a loader of the other mode refuses it. With a GPU
(or ``mix_in="torch"``, or numba switched off) the operation is left out:
FFCV's ``ToTensor`` and ``ToDevice`` move the canvases and the torch
``BatchTransform`` mixes and augments them on the device.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from backmix.cam_cache.maps import ForegroundMaps
from backmix.osr_data.decode import CANVAS_MODES
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.index import ImageIndex

from .augment import fill_value, normalize, normalize_constants, resize_tables
from .batch import BackMixBatch, BatchTransform, host_masks, to_device
from .beton import NOT_A_CANVAS, require_ffcv, skipped_rows
from .beton_location import DEFAULT_MODE, DEFAULT_QUALITY, find_beton
from .config import LoaderConfig, LoaderPosition, choose_device, loader_inputs

log = logging.getLogger("backmix")

MIX_IN = ("auto", "ffcv", "torch")
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
        b, s, size = images.shape[0], images.shape[1], clean.shape[2]
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
        b, s, size = images.shape[0], images.shape[1], clean.shape[2]
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


def batch_layout(b: int, canvas: int, crop: int, crops: int) -> tuple[int, int, int, int]:
    """Byte offsets in one batch's output buffer holding the canvases and ``crops`` float crop planes:
    canvas ends, floats start (4-aligned), first plane ends, buffer ends."""
    end = 3 * b * canvas * canvas
    start = (end + 3) // 4 * 4
    plane = 4 * 3 * b * crop * crop
    return end, start, start + plane, start + plane * crops


def split_batch(buf, b: int, canvas: int, crop: int, clean: bool, mixed: bool):
    """(canvas uint8 [B,3,S,S], clean float32 [B,3,s,s] or None, mixed or None): contiguous views
    of ``buf`` (numpy or torch, 1-D uint8); the clean plane comes first."""
    end, start, mid, stop = batch_layout(b, canvas, crop, clean + mixed)
    f32 = np.float32 if isinstance(buf, np.ndarray) else torch.float32
    planes = [buf[start:mid], buf[mid:stop]][:clean + mixed]
    planes = [x.view(f32).reshape(b, 3, crop, crop) for x in planes]
    return buf[:end].reshape(b, 3, canvas, canvas), planes[0] if clean else None, planes[-1] if mixed else None


def whole_image(height, width, scale, ratio):
    """Crop generator for FFCV's resized-crop decoder: the whole image (it is then resized)."""
    return 0, 0, height, width


def centre_square(height, width, scale, ratio):
    """Crop generator for FFCV's resized-crop decoder: the centre square (it is then resized), i.e.
    the shorter side resized and the centre cropped, up to where the rounding falls."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def _resize_decoder(canvas_mode: str):
    from ffcv.fields.rgb_image import ResizedCropRGBImageDecoder

    crop = centre_square if canvas_mode == "center" else whole_image

    class ResizeRGBImageDecoder(ResizedCropRGBImageDecoder):
        """Decodes and resizes the image to the ``output_size`` canvas in the loader's canvas mode,
        close to ``to_canvas`` (OpenCV's resize, not torchvision's)."""

        def __init__(self, output_size) -> None:
            super().__init__(output_size)
            self.scale, self.ratio = None, 1.0

        @property
        def get_crop_generator(self):
            return crop

    return ResizeRGBImageDecoder


class _OurOrder:
    """Stands in for FFCV's traversal order: our batches, flattened."""

    def __init__(self, loader: "FfcvLoader") -> None:
        self.loader = loader

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.loader.epoch_order(epoch)


class _Recycler:
    """Output buffers, reused once nothing outside holds them any more.

    A new buffer per batch costs its page faults (as much as the kernel); FFCV's own buffers
    are overwritten a few batches later, under tensors the training loop may still hold.
    A buffer whose tensors are all gone has only our references left, and then nobody
    can make a new one: it is free. Used from FFCV's one loading thread only.
    """

    def __init__(self, keep: int) -> None:
        self.keep, self.buffers = keep, []

    def take(self, nbytes: int) -> np.ndarray:
        spare = None
        for k in range(len(self.buffers)):
            buf = self.buffers[k]
            if sys.getrefcount(buf) == 3:        # self.buffers, ``buf`` and getrefcount's argument
                if buf.nbytes == nbytes:
                    return buf
                spare = k
        new = np.empty(nbytes, np.uint8)
        if len(self.buffers) < self.keep:
            self.buffers.append(new)
        elif spare is not None:                # e.g. the last, short batch's: make room
            self.buffers[spare] = new
        return new


def _mix_operation(loader: "FfcvLoader"):
    from ffcv.pipeline.operation import Operation

    cfg = loader.config
    clean = cfg.clean or not cfg.backmix
    lut = normalize_table(cfg.mean, cfg.std)
    scale, shift = (t.numpy() for t in normalize_constants(torch.tensor(cfg.mean), torch.tensor(cfg.std)))
    bh, bw = loader.sampler.box_hw
    cell = cfg.canvas // cfg.grid

    recycler = _Recycler(keep=8)

    class BackMixOperation(Operation):
        """[B, S, S, 3] canvases -> one 1-D uint8 buffer of ours: canvases, clean crops, mixed crops
        (either crop plane left out when not asked for).

        The training loop holds views of it, with no copy on its thread (see ``_Recycler``).
        State: the loader's per-epoch tables, found by sample index."""

        def generate_code(self):
            # Compiled here, after FFCV's loader has set its thread count (prange or range).
            kernel = compile_resized_crop_kernel() if cfg.resizes else compile_mix_kernel()
            patches = []   # the pasted boxes of resized crops: one buffer, FFCV's one thread uses it

            def op(images, _, indices):
                b = len(images)
                p, masks = loader.batch_tables(np.asarray(indices, dtype=np.int64))
                buf = recycler.take(batch_layout(b, cfg.canvas, cfg.crop, clean + cfg.backmix)[-1])
                canvas, images_out, mixed_out = split_batch(buf, b, cfg.canvas, cfg.crop, clean, cfg.backmix)
                first = images_out if clean else mixed_out
                second = first if mixed_out is None else mixed_out
                two, mix = clean and cfg.backmix, cfg.backmix and b > 1   # a lone image is not mixed
                if not cfg.resizes:
                    kernel(images, canvas, first, second, p["partners"], p["boxes"], masks, p["crops"],
                           p["flips"], lut, loader.fill, two, mix, bh, bw, cell)
                    return buf
                if not patches or len(patches[0]) < b:
                    patches[:] = [np.empty((b, bh, bw, 3), np.uint8)]
                tables = [t.numpy() for t in resize_tables(*(torch.from_numpy(p[k]) for k in
                                                             ("crops", "crop_sizes", "flips")), cfg.crop)]
                kernel(images, canvas, first, second, patches[0], p["partners"], p["boxes"], masks, *tables,
                       scale, shift, loader.fill, two, mix, bh, bw, cell)
                return buf
            op.with_indices = True
            return op

        def declare_state_and_memory(self, previous_state):
            return replace(previous_state, jit_mode=False, shape=(-1,), dtype=np.dtype("u1")), None

    return BackMixOperation()


def _open_beton(path: Path, index: ImageIndex):
    """(FFCV Reader, dataset rows stored as marked blanks) of a beton that holds ``index``, in order."""
    from ffcv.reader import Reader
    try:
        reader = Reader(str(path))
        names = list(reader.handlers)
        stored_rows = reader.metadata[f"f{names.index('index')}"]
        stored_labels = reader.metadata[f"f{names.index('label')}"]
    except (ValueError, KeyError, AssertionError, OSError) as e:
        raise BackMixError(f"{path} is not a backmix beton ({e})") from None
    blank = skipped_rows(stored_rows)
    whole = stored_rows >= 0
    if (reader.num_samples != len(index)
            or not np.array_equal(np.where(whole, stored_rows, -1 - stored_rows), np.arange(len(index)))
            or not np.array_equal(stored_labels[whole], index.labels[whole])):
        raise BackMixError(f"{path} holds {reader.num_samples} images that are not the {len(index)} "
                           f"rows (and labels) of {index.root}: write it with `backmix data write-beton`")
    return reader, blank


class FfcvLoader(LoaderPosition):
    """Yields ``BackMixBatch`` for the images ``indices`` (default: all) of ``index``, from an FFCV .beton.

    beton: the file to read (default: the one ``backmix data write-beton --canvas S`` writes for this
    data, beside the image folder or in the user's cache; none there: an error that says the command);
    beton_mode, jpeg_quality: which default beton, "raw" canvases (the reference stream) or "jpg" ones.
    Images the beton holds as marked blanks (``write-beton --on-error skip``) are left out under
    ``config.on_error == "skip"`` (counted in ``skipped``) and refused otherwise. mix_in: "ffcv" (the FFCV op, CPU), "torch" (the torch kernel on the
    device after the transfer), "auto" (torch on a GPU, the FFCV op otherwise).
    """

    backend = "ffcv"

    def __init__(self, index: ImageIndex, config: LoaderConfig, maps: Optional[ForegroundMaps] = None,
                 indices: Optional[np.ndarray] = None, label_map: Optional[np.ndarray] = None, *,
                 beton: Optional[str | Path] = None, mix_in: str = "auto", beton_mode: str = DEFAULT_MODE,
                 jpeg_quality: int = DEFAULT_QUALITY) -> None:
        require_ffcv()
        from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.pipeline.compiler import Compiler

        if mix_in not in MIX_IN:
            raise BackMixError(f"mix_in must be one of {MIX_IN}, got {mix_in!r}")
        self.index, self.config = index, config
        self.beton = Path(beton) if beton else find_beton(index, config.canvas, config.canvas_mode, beton_mode,
                                                          jpeg_quality)
        if not self.beton.exists():
            raise BackMixError(f"beton {self.beton} does not exist; write it with `backmix data write-beton "
                               f"--data {index.root} --canvas {config.canvas} --canvas-mode {config.canvas_mode} "
                               f"--out {self.beton}`")
        reader, blank = _open_beton(self.beton, index)
        if len(blank) and config.on_error == "raise":
            raise BackMixError(f"{self.beton} holds {len(blank)} image(s) that did not decode, e.g. "
                               f"{index.abspath(int(blank[0]))}: pass on_error='skip' to leave them out")
        rows = np.arange(len(index)) if indices is None else np.asarray(indices, dtype=np.int64)
        kept = np.isin(rows, blank, invert=True)
        for row in rows[~kept]:
            log.warning("skipped %s: it did not decode when the beton was written", index.abspath(int(row)))
        self.maps, self.dataset_indices, self.epoch_sampler, self.row_labels = loader_inputs(
            index, config, maps, rows[kept], label_map)
        self.sampler = config.sampler()
        self.device = choose_device(config.device)
        if mix_in == "auto":   # auto augment is torchvision's ops: the torch transform
            mix_in = ("torch" if self.device.type == "cuda" or not Compiler.is_enabled
                      or config.auto_augment != "none" else "ffcv")
        if mix_in == "ffcv" and config.auto_augment != "none" and config.train:
            raise BackMixError("auto_augment runs in the torch batch transform: use mix_in='torch' or 'auto'")
        self.mix_in = mix_in
        self.fill = fill_value(config.mean).numpy()
        self.transform = BatchTransform.for_config(self.maps, config)
        self._start_position()
        self.skipped = int((~kept).sum())
        self.plan: list[tuple[int, np.ndarray]] = []
        self._step_of = np.full(len(index), -1, dtype=np.int64)   # dataset row -> step, this epoch
        names = list(reader.handlers)
        image_meta = reader.metadata[f"f{names.index('image')}"]
        # A beton older than the canvas modes holds stretched canvases.
        stored_modes = (reader.metadata[f"f{names.index('canvas_mode')}"] if "canvas_mode" in names
                        else np.full(reader.num_samples, CANVAS_MODES.index("stretch")))
        at_canvas = bool(((image_meta["height"] == config.canvas) & (image_meta["width"] == config.canvas)).all())
        stored = {CANVAS_MODES[int(m)] for m in np.unique(stored_modes) if m != NOT_A_CANVAS}
        if at_canvas and stored - {config.canvas_mode}:
            raise BackMixError(f"{self.beton} holds {', '.join(sorted(stored))} canvases, the loader makes "
                               f"{config.canvas_mode} ones: write it with `backmix data write-beton "
                               f"--canvas {config.canvas} --canvas-mode {config.canvas_mode}`")
        decoder = (SimpleRGBImageDecoder() if at_canvas
                   else _resize_decoder(config.canvas_mode)((config.canvas, config.canvas)))
        if self.mix_in == "ffcv":
            image = [decoder, _mix_operation(self)]
        else:
            # FFCV's own transfer (pinned, asynchronous on its CUDA stream), then a [B, 3, S, S] view
            # (channels-last memory) of its device buffer, which the torch kernel reads.
            from ffcv.transforms import ToDevice, ToTensor, ToTorchImage
            image = [decoder, ToTensor(), ToDevice(self.device, non_blocking=True), ToTorchImage(channels_last=True)]
        self._ffcv = Loader(str(self.beton), batch_size=config.batch_size,
                            num_workers=max(1, config.num_workers), order=OrderOption.SEQUENTIAL,
                            indices=self.dataset_indices, drop_last=False, batches_ahead=2,
                            pipelines={"image": image, "label": [IntDecoder()], "index": [IntDecoder()],
                                       "canvas_mode": None})
        self._ffcv.traversal_order = _OurOrder(self)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The batches of the iteration being started (``plan``: the epoch's, from the resume step on)
        flattened to dataset rows; remembers each row's step."""
        rows = [r for _, r in self.plan]
        order = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        self._step_of[order] = np.repeat([step for step, _ in self.plan], [len(r) for r in rows])
        return order.astype(np.uint64)

    def batch_tables(self, rows: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The shared sampler's params and the top-k masks for the batch holding dataset rows ``rows``."""
        cfg = self.config
        p = self.sampler.draw(len(rows), self.epoch, int(self._step_of[rows[0]]), cfg.rank, train=cfg.train)
        if cfg.backmix:
            masks = host_masks(self.maps, rows, self.sampler.top_k_ratio, p.tie_break)
        else:   # the kernel does not read them
            masks = np.zeros((len(rows), cfg.grid, cfg.grid), dtype=bool)
        return {"partners": p.partners, "boxes": p.boxes, "crops": p.crops, "flips": p.flips,
                "crop_sizes": p.crop_sizes}, masks

    def __iter__(self) -> Iterator[BackMixBatch]:
        self.maps.refresh()   # a new cache generation takes effect at an epoch boundary
        self._ffcv.next_epoch = self.epoch
        self.plan = self.epoch_plan()
        cfg, dev = self.config, self.device
        for (step, _), (out, _, ids) in zip(self.plan, self._ffcv):
            # FFCV reuses its own buffers a few batches later: what we yield must not point there
            # (``take`` copies the rows; the labels come from our own table, on the host).
            rows = np.asarray(ids).reshape(-1).astype(np.int64)
            if self.mix_in == "torch":
                canvas = out.clone(memory_format=torch.contiguous_format)   # out is on the device already
                images, mixed = self.transform(canvas, rows, epoch=self.epoch, step=step, rank=cfg.rank)
            else:
                # Views of the op's buffer: it is not reused while any of them lives.
                canvas, images, mixed = (None if x is None else to_device(x, dev) for x in split_batch(
                    torch.from_numpy(out), len(rows), cfg.canvas, cfg.crop, cfg.clean, cfg.backmix))
            self.next_step = step + 1
            yield self.deliver(BackMixBatch(canvas, images, mixed, *self.row_labels.take(rows, dev)))
        self.next_step = len(self)
