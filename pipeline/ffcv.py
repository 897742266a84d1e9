"""The FFCV backend: a source (``pipeline/core.py``) reading a .beton.

Canvases. A beton written at the canvas size (``write-beton --canvas S``, what
the loader looks for by default; it never writes one itself) is decoded as is; in "raw" mode those
canvases are the reference loader's bit for bit. A beton of other sizes
(``--max-resolution``) is decoded and resized to S x S by FFCV (OpenCV's
resize: close to, not equal to, torchvision's). The beton stores each sample's canvas mode; a
loader of the other mode refuses it. Images the beton holds as marked blanks (``write-beton
--on-error skip``) are left out by ``FfcvSource.rows`` (counted in ``skipped``).

Order. FFCV's loader is built in sequential order over the loader's rows and its traversal order is
replaced by the core's plan, flattened, so FFCV cuts exactly the plan's batches.

Mix ("fused" kind, on the CPU). An FFCV ``Operation`` after the decoder runs the numba kernels of
``ffcv_kernels`` (compiled by FFCV's ``Compiler``: parallel over the batch, GIL released, on FFCV's
own thread, ahead of the training loop). It finds its batch's step from the sample indices FFCV
hands it, takes that step's params and masks from ``LoaderView.inputs`` and writes the crop/flip/normalised
clean and mixed images (float32; each only when asked for) into buffers it declares to FFCV
(``AllocationQuery``); the decoded canvases pass through, copied out (CHW) only for batches that
carry them (``Loader.wants_canvas``). Normalising is a lookup in a table made by
``pipeline.augment.normalize`` itself, so the floats are the torch op's bit for bit; with ``--augment
rrc`` the kernel resamples with the torch op's tables (``resize_tables``, remade in numba bit for
bit) and arithmetic, to 3e-5 (fastmath).

"decode" kind (a GPU, ``mix_in="torch"``, or numba switched off): the operation is left out; FFCV's
``ToTensor`` and ``ToDevice`` move the canvases and the core's ``BatchTransform`` mixes them there.

Crops cut from the image (``--crop-from image``, always "decode" kind). A beton written with ``write-beton
--whole-images`` also holds each image's file, its bytes as they were indexed. An op on the index field
reads each batch's files out of a read-only map of the beton, decodes each whole with the reference's
decoder and stretches it to its canvas: the reference's read, so the stream is the reference's bit for
bit; the core cuts, mixes and normalises the crops from those whole images (``SourceBatch.photos``). A
beton without the files is refused in one line naming the command that writes them; one whose files are
not as long as the index recorded them, or lie past its end, too.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from backmix.osr_data.canvas_reads import decode_canvas_and_image, pad_photos
from backmix.osr_data.decode import CANVAS_MODES
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.index import INDEX_NAME, ImageIndex
from backmix.osr_data.normalize import normalize_constants

from .augment import fill_value
from .batch_pool import BatchPool
from .beton import FILE_FIELD, NOT_A_CANVAS, require_ffcv, skipped_rows
from .beton_location import DEFAULT_QUALITY, DEFAULT_STORAGE, find_beton, write_command
from .core import Loader, Plan, Source, SourceBatch
from .ffcv_kernels import (compile_mix_kernel, compile_resized_crop_kernel, normalize_table, resize_scratch,
                           span_scales)

log = logging.getLogger("backmix")

MIX_IN = ("auto", "ffcv", "torch")
BATCHES_AHEAD = 2   # batches FFCV makes ahead of the training loop


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


def _guarded(source: "FfcvSource", run):
    """``run(data, buffers, rows)`` as an FFCV op: an exception it raises ends only the iteration, which
    ``batches`` raises as one line at that batch; left to FFCV it would end FFCV's thread and leave the
    loop waiting on it."""
    def op(data, buffers, indices):
        rows = np.asarray(indices, dtype=np.int64)
        try:
            return run(data, buffers, rows)
        except Exception as error:
            source.fail(error, rows)
            return (data,)   # not used: ``batches`` raises at this batch
    op.with_indices = True
    return op


def _mix_operation(source: "FfcvSource"):
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.operation import Operation

    cfg, view = source.config, source.view
    clean = cfg.clean or not cfg.backmix
    lut = normalize_table(cfg.mean, cfg.std)
    scale, shift = (t.numpy() for t in normalize_constants(torch.tensor(cfg.mean), torch.tensor(cfg.std)))
    fill = fill_value(cfg.mean).numpy().copy()   # writable: one kernel signature whatever torch hands out
    bh, bw = view.box_hw
    cell = cfg.canvas // cfg.grid
    u8, f32 = np.dtype("u1"), np.dtype("f4")
    outputs = clean + cfg.backmix
    # The clean and/or the mixed crop: written into arrays each batch then owns (no copy out of a slot).
    crops = BatchPool(cfg.batch_size, [(3, cfg.crop, cfg.crop)] * outputs, f32, size=BATCHES_AHEAD + 4)
    # Per sample, with resized crops: the box the mix pastes and the kernel's scratch.
    memory = ([AllocationQuery((bh, bw, 3), u8)] * (cfg.resizes and cfg.backmix)
              + [AllocationQuery(*q) for q in (resize_scratch(cfg.canvas, cfg.crop) if cfg.resizes else [])])
    no_patch = np.empty((0, bh, bw, 3), u8)   # the kernel reads no box without BackMix

    class BackMixOperation(Operation):
        """[B, S, S, 3] decoded canvases -> (those canvases, then the clean and/or the mixed crop float32
        [B, 3, s, s], written into ``BatchPool`` arrays the batch owns). Its scratch is in the buffers it
        declares; FFCV hands it the batch's slot of them (reused ``BATCHES_AHEAD + 2`` batches later)."""

        def generate_code(self):
            # Compiled here, after FFCV's loader has set its thread count (prange or range).
            kernel = compile_resized_crop_kernel() if cfg.resizes else compile_mix_kernel()

            def run(images, buffers, rows):
                p, masks = view.inputs(source.step_of(rows), rows)
                planes = crops.take(len(rows))
                # The clean crop, then the mixed one; one array twice when only one is asked for.
                first, second = planes[0], planes[-1]
                two, mix = clean and cfg.backmix, cfg.backmix and len(rows) > 1   # a lone image is not mixed
                if not cfg.resizes:
                    kernel(images, first, second, p.partners, p.boxes, masks, p.crops, p.flips, lut, fill,
                           two, mix, bh, bw, cell)
                else:
                    patch = buffers[0] if cfg.backmix else no_patch
                    pixels = images.reshape(len(images), cfg.canvas, cfg.canvas * 3)   # a view: rows flat
                    kernel(pixels, first, second, patch, *buffers[-4:], p.partners, p.boxes, masks, p.crops,
                           p.crop_sizes, span_scales(p.crop_sizes, cfg.crop), p.flips, scale, shift, fill, two, mix,
                           bh, bw, cell)
                # The decoded canvases go out as they are (FFCV's slot of them, kept until that slot is
                # reused): ``batches`` copies them out only when the loader wants the canvas then.
                return (images, *planes)
            return _guarded(source, run)

        def declare_state_and_memory(self, previous_state):
            # Not jitted: the op calls back into Python (``LoaderView.inputs``) before its compiled kernel.
            return replace(previous_state, jit_mode=False), memory

    return BackMixOperation()


def _whole_image_operation(source: "FfcvSource"):
    from ffcv.pipeline.operation import Operation

    index, cfg = source.index, source.config

    class WholeImageOperation(Operation):
        """The batch's dataset rows (FFCV's decoded index field) -> (those rows, canvases uint8 [B, 3, S, S],
        ``Photos``): each row's file read from the beton (``FfcvSource.file_bytes``, out of a read-only map
        of it: no buffer sized for the largest file), decoded whole by the reference's decoder and stretched to its
        canvas, the reference's read (``decode_canvas_and_image``) bit for bit. Run from FFCV's thread, ahead
        of the training loop, on ``num_workers`` threads (torch's decode and resize release the GIL); the
        core cuts and mixes the crops (``BatchTransform``)."""

        def generate_code(self):
            pool = ThreadPoolExecutor(max(1, cfg.num_workers), thread_name_prefix="backmix-ffcv-decode")

            def read(row):
                return decode_canvas_and_image(index.abspath(int(row)), cfg.canvas, cfg.canvas_mode,
                                               source.file_bytes(row))

            def run(ids, _, __):
                rows = np.asarray(ids).reshape(-1).astype(np.int64)   # a copy: ``ids`` is FFCV's buffer
                canvases, images = zip(*pool.map(read, rows))
                return rows, torch.stack(canvases), pad_photos(list(images))
            return _guarded(source, run)

        def declare_state_and_memory(self, previous_state):
            return replace(previous_state, jit_mode=False), None

    return WholeImageOperation()


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


class FfcvSource(Source):
    """Batches from an FFCV .beton: "fused" (the FFCV op mixes on the CPU) or "decode" (FFCV decodes and
    moves the canvases; the core's ``BatchTransform`` mixes them on the device).

    beton: the file to read (default: the one ``backmix data write-beton --canvas S`` writes for this
    data, beside the image folder or in the user's cache; none there: an error that says the command);
    beton_mode, jpeg_quality: which default beton, "raw" canvases (the reference stream) or "jpg" ones.
    Images the beton holds as marked blanks (``write-beton --on-error skip``) are left out under
    ``config.on_error == "skip"`` (counted in ``skipped``) and refused otherwise. mix_in: "ffcv" (the
    FFCV op, CPU), "torch" (the torch kernel on the device after the transfer), "auto" (torch on a
    GPU, the FFCV op otherwise).
    """

    name = "ffcv"
    # Crops cut from the image: from a beton that holds each image's file (``write-beton --whole-images``).
    whole_images_refused = None

    def __init__(self, index, config, device, *, beton: Optional[str | Path] = None, mix_in: str = "auto",
                 beton_mode: str = DEFAULT_STORAGE, jpeg_quality: int = DEFAULT_QUALITY) -> None:
        super().__init__(index, config, device)
        require_ffcv()
        from ffcv.pipeline.compiler import Compiler

        if mix_in not in MIX_IN:
            raise BackMixError(f"mix_in must be one of {MIX_IN}, got {mix_in!r}")
        cfg = config
        self.beton = Path(beton) if beton else find_beton(index, cfg.canvas, cfg.canvas_mode, beton_mode, jpeg_quality,
                                                          cfg.crops_images)
        self.explicit_beton, self.beton_mode, self.jpeg_quality = bool(beton), beton_mode, jpeg_quality
        if not self.beton.exists():
            raise BackMixError(f"beton {self.beton} does not exist; write it with `{self._write_command()}`")
        reader, self.blank = _open_beton(self.beton, index)
        if len(self.blank) and cfg.on_error == "raise":
            raise BackMixError(f"{self.beton} holds {len(self.blank)} image(s) that did not decode, e.g. "
                               f"{index.abspath(int(self.blank[0]))}: pass on_error='skip' to leave them out")
        if cfg.crops_images:   # the FFCV op mixes canvases; crops cut from the image are the core's
            if mix_in == "ffcv":
                raise BackMixError("crops cut from the image (crop_from='image') are mixed by the torch batch "
                                   "transform: use mix_in='torch' or 'auto'")
            mix_in = "torch"
            self.file_spans = _file_spans(reader, self.beton, index, self._write_command(force=True))
        if mix_in == "auto":   # auto augment is torchvision's ops: the torch transform
            mix_in = ("torch" if device.type == "cuda" or not Compiler.is_enabled
                      or cfg.auto_augment != "none" else "ffcv")
        if mix_in == "ffcv" and cfg.auto_augment != "none" and cfg.train:
            raise BackMixError("auto_augment runs in the torch batch transform: use mix_in='torch' or 'auto'")
        self.mix_in = mix_in
        self.kind = "fused" if mix_in == "ffcv" else "decode"
        self.decoder = None if cfg.crops_images else _canvas_decoder(reader, self.beton, cfg)
        self.plan: Plan = []
        self._epoch, self._failure = None, None   # FFCV's epoch iterator; what ended its thread early

    def rows(self, rows: np.ndarray) -> np.ndarray:
        kept = np.isin(rows, self.blank, invert=True)
        for row in rows[~kept]:
            log.warning("skipped %s: it did not decode when the beton was written", self.index.abspath(int(row)))
        return rows[kept]

    def open(self, rows, view) -> None:
        from ffcv.fields.decoders import IntDecoder
        from ffcv import loader as ffcv_loader

        super().open(rows, view)
        cfg = self.config
        self._check_files_unchanged()
        self._step = np.full(len(self.index), -1, dtype=np.int64)   # dataset row -> its step, this iteration
        if cfg.crops_images:   # the files are read from the beton by the op on the index field
            self._files = np.memmap(self.beton, np.uint8, mode="r")
            pipelines = {"image": None, "index": [IntDecoder(), _whole_image_operation(self)]}
        elif self.kind == "fused":
            pipelines = {"image": [self.decoder, _mix_operation(self)]}
        else:
            # FFCV's own transfer (pinned, asynchronous on its CUDA stream), then a [B, 3, S, S] view
            # (channels-last memory) of its device buffer, which the torch kernel reads.
            from ffcv.transforms import ToDevice, ToTensor, ToTorchImage
            pipelines = {"image": [self.decoder, ToTensor(), ToDevice(self.device, non_blocking=True),
                                   ToTorchImage(channels_last=True)]}
        # A field the pipelines leave out would be decoded by FFCV's default (the files too: never).
        pipelines = {FILE_FIELD: None, "label": [IntDecoder()], "index": [IntDecoder()], "canvas_mode": None,
                     **pipelines}
        self._ffcv = ffcv_loader.Loader(
            str(self.beton), batch_size=cfg.batch_size, num_workers=max(1, cfg.num_workers),
            order=ffcv_loader.OrderOption.SEQUENTIAL, indices=rows, drop_last=False,
            batches_ahead=BATCHES_AHEAD, pipelines=pipelines)
        # FFCV's Loader takes only its own order options, so the plan's order replaces its traversal
        # order once it is built: FFCV asks it for each iteration's rows (``sample_order``).
        self._ffcv.traversal_order = self

    def _check_files_unchanged(self) -> None:
        """The beton was written from the index's files (its default name holds the index's fingerprint,
        the files' sizes and mtimes included): a file changed since is refused, as the reference loader
        refuses it at its read, rather than trained on as the beton's old pixels."""
        index = self.index
        changed = index.first_changed(self.dataset_rows)
        if changed is None:
            return
        rewrite = self._write_command(force=self.explicit_beton)
        raise BackMixError(f"image {index.abspath(changed)} is gone or changed after "
                           f"{index.root / INDEX_NAME} was written, so {self.beton} no longer holds it: "
                           f"delete that index file, then rewrite the beton with `{rewrite}`")

    def _write_command(self, force: bool = False) -> str:
        """The command that writes this loader's beton (``force``: again, over the one there)."""
        cfg = self.config
        command = write_command(self.index.root, cfg.canvas, cfg.canvas_mode, self.beton_mode, self.jpeg_quality,
                                cfg.crops_images)
        return command + (f" --out {self.beton}" if self.explicit_beton else "") + (" --force" if force else "")

    def file_bytes(self, row: int) -> torch.Tensor:
        """uint8 [N]: the file of dataset ``row`` as the beton holds it (a copy out of the map)."""
        start, length = self.file_spans[row]
        return torch.from_numpy(np.array(self._files[start:start + length]))

    def sample_order(self, epoch: int) -> np.ndarray:
        """FFCV's traversal order: the plan's rows, flattened (FFCV cuts them into the plan's batches).
        The op only sees a batch's sample indices, so each row's step is noted here for ``step_of``."""
        rows = [r for _, r in self.plan]
        order = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        self._step[order] = np.repeat([step for step, _ in self.plan], [len(r) for r in rows])
        return order.astype(np.uint64)

    def step_of(self, rows: np.ndarray) -> int:
        return int(self._step[rows[0]])

    def batches(self, plan: Plan) -> Iterator[SourceBatch]:
        self.plan, self._failure, cfg = plan, None, self.config
        self._epoch = epoch = iter(self._ffcv)
        done = False
        try:
            for (step, _), fields in zip(plan, epoch):
                if self._failure is not None and step >= self._failure[0]:
                    self._raise_failure()
                if cfg.crops_images:   # (label, the op's (rows, canvases, Photos)), made for this batch
                    rows, canvas, photos = fields[1]
                    yield SourceBatch(step, rows, canvas, [], photos=photos)
                    continue
                out, _, ids = fields
                rows = np.asarray(ids).reshape(-1).astype(np.int64)   # a copy: ``ids`` is FFCV's buffer too
                if self.kind == "decode":   # out: on the device already; cloned out of FFCV's buffer
                    yield SourceBatch(step, rows, out.clone(memory_format=torch.contiguous_format), [])
                else:
                    # The canvas is copied out only when a batch must carry it (``Loader.wants_canvas``), asked
                    # here, not in the op: canvases wanted part-way come with the batches already in flight too.
                    canvas = self._canvas(out[0][:len(rows)]) if self.view.wants_canvas else None
                    crops = [self._own(x) for x in out[1:]]
                    yield SourceBatch(step, rows, canvas, [], crops[0] if cfg.clean else None,
                                      crops[-1] if cfg.backmix else None)
            if self._failure is not None:
                self._raise_failure()
            done = True
        finally:
            if not done:   # an iteration left part-way: FFCV's thread stops making its batches
                epoch.close()

    def fail(self, error: Exception, rows: np.ndarray) -> None:
        """Called on FFCV's thread when the op fails on the batch of ``rows``: FFCV is given no more batches
        (its thread ends cleanly after this one) and ``batches`` raises the error, as one line, in its
        place. An exception left to FFCV would end its thread and leave the loop waiting forever."""
        self._failure = (self.step_of(rows), error)
        self._epoch.iter_ixes = iter(())

    def _raise_failure(self):
        step, error = self._failure
        lines = str(error).strip().splitlines()
        raise BackMixError(f"FFCV's loader thread failed at step {step} of {self.beton}: {type(error).__name__}"
                           + (f": {lines[0]}" if lines else "")) from error

    @staticmethod
    def _canvas(images: np.ndarray) -> torch.Tensor:
        """uint8 [B, 3, S, S] of FFCV's decoded [B, S, S, 3] canvases, a copy (the op runs on the CPU)."""
        return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))

    def _own(self, x: np.ndarray) -> torch.Tensor:
        """A crop of the op as a tensor: its pool's array itself on the CPU (``BatchPool``: the batch owns
        it, no copy), a copy on a GPU (the transfer; the pool's array is free once it returns)."""
        device = self.device
        return torch.from_numpy(x) if device.type == "cpu" else torch.from_numpy(x).to(device)


def _file_spans(reader, beton: Path, index: ImageIndex, rewrite: str) -> np.ndarray:
    """int64 [N, 2]: where each image's file lies in a beton written with ``--whole-images`` (offset,
    length). Each one stored lies inside the beton and is as long as the index recorded that file: a
    beton never makes the loader read past its end or hold more than the image folder's own files."""
    from ffcv.fields import BytesField

    names = list(reader.handlers)
    if FILE_FIELD not in names or not isinstance(reader.handlers[FILE_FIELD], BytesField):
        raise BackMixError(f"{beton} holds no image files, which crops cut from the image (--crop-from image) "
                           f"are decoded from: rewrite it with `{rewrite}`")
    meta = reader.metadata[f"f{names.index(FILE_FIELD)}"]
    spans = np.stack([meta["ptr"], meta["size"]], axis=1).astype(np.int64)   # uint64 past 2**63: negative
    stored = reader.metadata[f"f{names.index('index')}"] >= 0
    start, length = spans.T
    inside = (start >= 0) & (length == index.sizes) & (length <= beton.stat().st_size - start)
    if not (inside | ~stored).all():
        row = int(np.flatnonzero(stored & ~inside)[0])
        raise BackMixError(f"{beton} does not hold the file of {index.abspath(row)} as {index.root / INDEX_NAME} "
                           f"records it: rewrite it with `{rewrite}`")
    return spans


def _canvas_decoder(reader, beton: Path, cfg):
    """FFCV's decoder to the loader's canvas: as stored when the beton holds canvases of its size and mode
    (refused when of the other mode), else decoded and resized by FFCV."""
    from ffcv.fields.decoders import SimpleRGBImageDecoder

    names = list(reader.handlers)
    image_meta = reader.metadata[f"f{names.index('image')}"]
    if "canvas_mode" not in names:
        raise BackMixError(f"{beton} was written by an earlier backmix (no canvas mode field): "
                           f"`backmix data write-beton --canvas {cfg.canvas} --canvas-mode {cfg.canvas_mode}` "
                           "rewrites it")
    stored_modes = reader.metadata[f"f{names.index('canvas_mode')}"]
    at_canvas = bool(((image_meta["height"] == cfg.canvas) & (image_meta["width"] == cfg.canvas)).all())
    stored = {CANVAS_MODES[int(m)] for m in np.unique(stored_modes) if m != NOT_A_CANVAS}
    if at_canvas and stored - {cfg.canvas_mode}:
        raise BackMixError(f"{beton} holds {', '.join(sorted(stored))} canvases, the loader makes "
                           f"{cfg.canvas_mode} ones: write it with `backmix data write-beton "
                           f"--canvas {cfg.canvas} --canvas-mode {cfg.canvas_mode}`")
    return SimpleRGBImageDecoder() if at_canvas else _resize_decoder(cfg.canvas_mode)((cfg.canvas, cfg.canvas))


class FfcvLoader(Loader):
    """``Loader(FfcvSource, ...)``; arguments as ``Loader``'s, and ``FfcvSource``'s options."""

    def __init__(self, index, config, maps=None, indices=None, label_map=None, **options) -> None:
        super().__init__(FfcvSource, index, config, maps, indices, label_map, **options)
