"""The DALI backend: a fused source (``pipeline/core.py``) whose one DALI pipeline decodes, mixes,
crops, flips and normalises each batch, decoding only the image regions its crops show.

The loader core owns the plan, position, maps, ``on_error``, labels and device; every random choice
and the masks come from ``Loader.inputs``, fed in per batch through one ``fn.external_source``, so
the stream is ReferenceLoader's within a resize's difference (the bounds: tests/test_dali.py).

No canvas is made for the crops. A box on the canvas is a region of the image (the canvas is a scaled
square of it: "center" the shorter side resized and the centre square, "stretch" both sides resized;
``canvas_to_image``), so each crop decodes only its box's image region (fn.decoders.image_slice; the
image's size from its header, fn.peek_image_shape) and resizes it once to the crop (``decode_box``).
The plain crop samples the canvas's own pixel grid (within a few grey levels of the reference); a
resized crop is resized once where the reference resizes twice.

The mix (target i borrows from partner j = partners[i]), as DALI ops:
  host     the top-k cells of each image's g x g map (``top_k_mask``; tiny), and per target the
           rectangle of its crop whose pixel centres fall in its pasted box (``lend_boxes``)
  lent     the partner's file (``permute_batch``) decodes only the region under that rectangle
           (the box moved by src - dst on its canvas), resized to the rectangle, and blanks its
           foreground: the partner's mask sampled at each pixel's centre (nearest)
  mixed    ``multi_paste`` of the target's clean crop, then the lent rectangle
CPU and GPU ("mixed" decoder) run the same graph. A batch of one is left as it is, as the kernel.
The canvas, only while the loader wants it (``Loader.wants_canvas``: batches carry it, or an in-loop
rebuild reads it), is decoded whole as before (``decode_to_canvas``); the crops never read it.
"""
from __future__ import annotations

import io
import logging
import os
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch
from PIL import Image

from backmix.osr_data.decode import DecodeError, decode_rgb, read_bytes, read_canvas
from backmix.osr_data.errors import BackMixError

from .augment import fill_value
from .backmix import stretched_span
from .core import Loader, Plan, Source, SourceBatch
from .dali_ops import PREFETCH, decode_box, decode_to_canvas

log = logging.getLogger("backmix")

# A forked child (a torch DataLoader worker, say) inherits DALI pipeline objects but not
# their threads; destroying one there waits forever on the executor's condition variables.
# So a child keeps every pipeline it inherited alive and never runs their destructors.
_LIVE_PIPELINES: "weakref.WeakSet" = weakref.WeakSet()
_INHERITED: list = []


def _keep_in_children() -> None:
    _INHERITED.extend(list(_LIVE_PIPELINES))


os.register_at_fork(after_in_child=_keep_in_children)


class _Fed(NamedTuple):
    """One step of the plan as the feeder handled it. DALI pulls the external source ahead of the
    consumer (prefetch), so the host must remember which batch each output of the pipeline is."""
    step: int
    planned: np.ndarray   # the step's rows as planned (a replay starts from them again)
    ids: np.ndarray       # the rows fed to DALI; none: every file failed before feeding, no DALI output
    failed: list          # the errors of files dropped before feeding, in batch order


def _file_bytes(path: str, size: int, mode: str) -> np.ndarray:
    """``read_canvas``'s "decode" for DALI: the file's bytes (the graph decodes them)."""
    return read_bytes(path).numpy()


class _Feeder:
    """The external_source callback: one call = the next batch of the plan, as DALI inputs.

    It reads the batch's files with the one checked read (``read_canvas``: a file missing or changed
    since indexing is an error the core raises) on the source's ``readers`` pool, one thread per
    worker, and takes the batch's params and masks from ``Loader.inputs``; every pixel is DALI's."""

    def __init__(self, source: "DaliSource") -> None:
        # Weak: the pipeline holds this callback, and a source <-> pipeline cycle would leave the
        # pipeline to the cyclic GC, which may run in a forked child (see _keep_in_children).
        self._source = weakref.ref(source)
        self.pending: deque = deque()     # (step, rows) of the plan not yet fed
        self.fed: deque[_Fed] = deque()   # what is inside the pipeline, in order

    def start(self, plan: Plan) -> None:
        self.pending, self.fed = deque(plan), deque()

    def __call__(self):
        source = self._source()
        if source is None:
            raise StopIteration
        while self.pending:
            step, planned = self.pending.popleft()
            rows = planned.tolist()
            # Read in parallel (file reads release the GIL), kept in the batch's order.
            reads = source.readers.map(source.read, rows)
            good, data, failed = [], [], []
            for i, raw in zip(rows, reads):
                if isinstance(raw, Exception):
                    failed.append(raw)
                else:
                    good.append(i)
                    data.append(raw)
            ids = np.asarray(good, dtype=np.int64)
            self.fed.append(_Fed(step, planned, ids, failed))
            if good:   # DALI takes no empty batch: a step none of whose files could be read is not fed
                return (data,) + source.pipeline_inputs(step, ids, data)
        raise StopIteration


class DaliSource(Source):
    """A fused source: one DALI pipeline decodes, mixes, crops, flips and normalises each batch.
    The loader's device: the pipeline runs on its GPU, or on the CPU."""

    name = "dali"
    kind = "fused"
    # What crops cut from the image would need: each image's size before its batch's draw (from the file
    # header), the boxes sliced from the decoded image (fn.decoders.image_slice) and the mix's lent box
    # resized to each target's box: the pipeline draws and mixes on canvases only.
    whole_images_refused = None   # crops cut from the image: the boxes are image regions, decoded as any box

    def __init__(self, loader) -> None:
        super().__init__(loader)
        cfg = loader.config
        if cfg.auto_augment != "none" and cfg.train:
            raise BackMixError("auto_augment runs in the torch batch transform: use the reference, torchvision, ffcv or ray loader")
        self.gpu = loader.device.type == "cuda"
        log.info("DALI pipeline on %s", "gpu" if self.gpu else "cpu")
        # Rows DALI failed to decode, with torchvision's error (the reference's message): dropped at feed time from then on.
        self.bad_rows: dict[int, DecodeError] = {}
        self.readers = ThreadPoolExecutor(max(1, cfg.num_workers), thread_name_prefix="backmix-read")
        self._feeder = _Feeder(self)

    def open(self) -> None:
        self._pipe = self._build()
        self._clean = True   # the pipeline holds no batch of an earlier iteration

    def read(self, row: int):
        """The bytes of dataset row ``row``, or the error that makes it fail (``read_canvas``'s "return")."""
        index, cfg = self.loader.index, self.loader.config
        if row in self.bad_rows:
            return self.bad_rows[row]
        return read_canvas(index, row, cfg.canvas, cfg.canvas_mode, "return", _file_bytes)

    def pipeline_inputs(self, step: int, ids: np.ndarray, files: list) -> tuple:
        """The batch's params (``Loader.inputs``) as DALI inputs (lists of numpy arrays), as
        ``crop_boxes`` and ``lend_boxes`` lay them out. Crops cut from the image are drawn in each
        image's size, read from its file's header."""
        cfg, box_hw = self.loader.config, self.loader.sampler.box_hw
        sizes = np.array([header_size(f) for f in files], dtype=np.int64) if cfg.crops_images else None
        p, masks = self.loader.inputs(step, ids, sizes)
        out = (list(p.flips.astype(np.int32)),) + crop_boxes(p)
        if not cfg.backmix:
            return out
        src, dst = p.boxes[:, 0:2], p.boxes[:, 2:4]
        if sizes is None:   # the box on the canvases; the partner's grid cells are canvas // grid pixels
            cells = np.full((len(ids), 2), 1.0 / (cfg.canvas // cfg.grid))
            spans = (dst, dst + box_hw, src, src + box_hw)
        else:               # the box in the images' pixels their stretched canvases' box covers (``stretched_span``)
            theirs = sizes[p.partners]
            cells = cfg.grid / theirs
            spans = image_spans(p.boxes, box_hw, sizes, theirs, cfg.canvas)
        return out + lend_boxes(p, masks, cfg.crop, spans, cells)

    # ----------------------------------------------------------------- the pipeline


    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        cfg = self.loader.config
        s, c = cfg.canvas, cfg.crop
        mode = "image" if cfg.crops_images else cfg.canvas_mode   # where the crop boxes are
        # The canvas leaves the pipeline only when batches carry it: its decode, transpose and copy out
        # cost about a batch's crops. An iteration that wants otherwise builds a new pipeline (``batches``).
        self._with_canvas = with_canvas = self.loader.wants_canvas
        gpu = self.gpu
        device = "gpu" if gpu else "cpu"
        # Locals only: the pipeline keeps its definition, which must not hold the loader.
        feeder, fill_rgb = self._feeder, fill_value(cfg.mean).numpy().reshape(1, 1, 3)
        norm = {"mean": [255.0 * m for m in cfg.mean], "std": [255.0 * v for v in cfg.std],
                "dtype": types.FLOAT, "output_layout": "CHW"}

        @pipeline_def(batch_size=cfg.batch_size, num_threads=max(1, cfg.num_workers),
                      device_id=self.loader.device.index if gpu else None,
                      prefetch_queue_depth=PREFETCH, seed=cfg.seed, exec_dynamic=True)
        def backmix_pipeline():
            n_in = 3 + 7 * cfg.backmix
            inputs = fn.external_source(source=feeder, num_outputs=n_in, batch=True,
                                        layout=[""] * 7 + ["HWC", "", ""] if cfg.backmix else [""] * 3)
            files, flips, box = inputs[:3]
            shape = fn.peek_image_shape(files, adjust_orientation=False)   # H, W, C on the host, from the header
            outs = []
            if with_canvas:
                outs.append(fn.transpose(decode_to_canvas(files, s, gpu, cfg.canvas_mode), perm=[2, 0, 1]))
            clean = decode_box(files, shape, box, c, s, mode, gpu)
            if cfg.clean:
                outs.append(fn.crop_mirror_normalize(clean, mirror=flips, **norm))
            if cfg.backmix:
                partners, lend_box, shown, cells, masks, paste_shapes, out_anchors = inputs[3:]
                # The partner's pixels under the pasted box as the crop shows them (``lend_boxes``):
                # only that region of the partner's image is decoded, and resized once.
                lender = fn.permute_batch(files, indices=partners)
                lent = decode_box(lender, fn.peek_image_shape(lender, adjust_orientation=False),
                                  lend_box, shown, s, mode, gpu)
                if gpu:
                    masks = masks.gpu()
                # The partner's foreground cell under each lent pixel's centre (nearest), blanked to the fill.
                fg = fn.resize(masks, size=shown, roi_start=cells[0:2], roi_end=cells[2:4],
                               roi_relative=False, interp_type=types.INTERP_NN, antialias=False)
                one = types.Constant(1, dtype=types.UINT8)
                fill = types.Constant(fill_rgb, dtype=types.UINT8, device=device)
                lent = lent * (one - fg) + fill * fg
                mixed = fn.multi_paste(clean, lent, shapes=paste_shapes, out_anchors=out_anchors, output_size=[c, c])
                outs.append(fn.crop_mirror_normalize(mixed, mirror=flips, **norm))
            return tuple(outs)

        pipe = backmix_pipeline()
        pipe.build()
        _LIVE_PIPELINES.add(pipe)
        return pipe

    # ----------------------------------------------------------------- iteration

    def batches(self, plan: Plan) -> Iterator[SourceBatch]:
        if not self._clean or self._with_canvas != self.loader.wants_canvas:
            # An iteration left part-way: DALI has pulled batches of it ahead, which a reset cannot drop;
            # or the canvas is wanted now and was not (an in-loop rebuild attached), or the other way round.
            self._pipe = self._build()
        feeder = self._feeder
        feeder.start(plan)
        self._clean = False
        while True:
            if self.loader.wants_canvas and not self._with_canvas:
                self._refeed()   # a rebuild attached part-way: the batches in flight again, with the canvas
            try:
                outs = self._pipe.run()
            except StopIteration:
                yield from self._unfed()
                self._pipe.reset()   # DALI needs a reset after its external source ends
                self._clean = True
                return
            except RuntimeError as e:
                self._replay(e)
                continue
            yield from self._unfed()
            fed = feeder.fed.popleft()
            crops = [self._to_torch(tl, torch.float32) for tl in outs[int(self._with_canvas):]]
            canvas = self._to_torch(outs[0], torch.uint8) if self._with_canvas else None
            cfg = self.loader.config
            images, mixed = crops[0] if cfg.clean else None, crops[-1] if cfg.backmix else None
            yield SourceBatch(fed.step, fed.ids, canvas, fed.failed, images, mixed)

    def close(self) -> None:
        # The pipeline's threads and buffers go now; an iteration after this builds a new one.
        self._pipe, self._clean = None, False

    def _unfed(self) -> Iterator[SourceBatch]:
        """The steps at the head of the queue that never reached DALI (every file failed before feeding)."""
        fed = self._feeder.fed
        while fed and not len(fed[0].ids):
            f = fed.popleft()
            yield SourceBatch(f.step, f.ids, None, f.failed)

    def _replay(self, error: RuntimeError) -> None:
        """DALI reports a file it cannot decode as a RuntimeError of the oldest batch in flight, without
        naming it: find the file(s) with torchvision's decoder, then feed that batch and every later one
        again to a fresh pipeline (the failed one may hold half-run state), now without them; the batch
        reports them as failed, in batch order, and the core applies ``on_error``."""
        feeder = self._feeder
        fed = next((f for f in feeder.fed if len(f.ids)), None)
        if fed is None:
            raise error
        index = self.loader.index
        bad = {int(i): e for i in fed.ids if (e := _decode_error(index.abspath(int(i)))) is not None}
        if not bad:
            why = " ".join(str(error).split())[:300] or type(error).__name__
            raise BackMixError(f"DALI failed on batch {fed.step} ({len(fed.ids)} images, all of which "
                               f"torchvision decodes): {why}")
        self.bad_rows.update(bad)
        self._refeed()

    def _refeed(self) -> None:
        """Feed every batch in flight and every later one again, to a fresh pipeline."""
        feeder = self._feeder
        feeder.start([(f.step, f.planned) for f in feeder.fed] + list(feeder.pending))
        self._pipe = self._build()

    def _to_torch(self, tl, dtype: torch.dtype) -> torch.Tensor:
        if not self.gpu:
            # Zero-copy: under DALI's dynamic executor an output owns its memory, which stays
            # valid while referenced (the numpy view keeps the DALI tensor alive), so there is
            # no need to copy ~30 MB a batch on the host.
            return torch.from_numpy(np.asarray(tl.as_tensor()))
        from nvidia.dali.plugin.pytorch import feed_ndarray
        t = tl.as_tensor()
        device = self.loader.device
        out = torch.empty(tuple(t.shape()), dtype=dtype, device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
        return out


def crop_boxes(p) -> tuple:
    """Each image's crop box on the canvas (float32 [4]: y, x, height, width), as a DALI input."""
    return (list(np.concatenate([p.crops, p.crop_sizes], axis=1).astype(np.float32)),)


def header_size(data: np.ndarray) -> tuple[int, int]:
    """(height, width) of an encoded image, from its header (pixels as stored, as the decoders)."""
    with Image.open(io.BytesIO(data.tobytes())) as im:
        return im.height, im.width


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


def lend_boxes(p, masks: np.ndarray, crop: int, spans: tuple, cells: np.ndarray) -> tuple:
    """What the mixed crop of target i takes from its partner j = partners[i], as DALI inputs.

    ``spans`` (t0, t1, s0, s1; [B, 2] each, y and x): the pasted box's pixels [t0, t1) in the target
    (where its crop is: the canvas, or the image) and the pixels [s0, s1) of the partner they show,
    stretched onto them. ``cells``: float [B, 2], grid cells per partner pixel. Crop pixel u shows the
    pixel under its centre, cy + (u + 1/2) h / crop (the nearest; the reference's linear resize blends
    it with its neighbour): those in [t0, t1) form the rectangle [u0, u1) x [v0, v1) of the crop, which
    shows the partner's pixels there. Returned: partners (int32); that rectangle's extent in the
    partner (float32 [4]: y, x, height, width; the only part of it decoded) and its size (float32 [2],
    at least 1: what it is resized to); the extent in the partner's grid cells (float32 [4]: y0, x0, y1,
    x1) and its top-k mask (uint8 g x g x 1); and the paste of the crop then the rectangle (shapes and
    corners, int32 [2, 2]; an empty rectangle pastes nothing). A batch of one is not mixed, as the kernel."""
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
    f32 = lambda a: list(a.astype(np.float32))   # noqa: E731
    return (list(p.partners.astype(np.int32)), f32(np.concatenate([at, extent], axis=1)), f32(shown.clip(1)),
            f32(np.concatenate([at * cells, (at + extent) * cells], axis=1)),
            list(masks[p.partners].astype(np.uint8)[..., None]), list(shapes), list(anchors))


def _decode_error(path: str) -> Optional[DecodeError]:
    """Why torchvision's decoder refuses the file, None when it decodes it."""
    try:
        decode_rgb(path)
    except DecodeError as e:
        return e
    return None


class DaliLoader(Loader):
    """``Loader(DaliSource, ...)``; arguments as ``Loader``'s."""

    def __init__(self, index, config, maps=None, indices=None, label_map=None) -> None:
        super().__init__(DaliSource, index, config, maps, indices, label_map)
