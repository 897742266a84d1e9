"""The DALI backend: a fused source (``pipeline/core.py``) whose one DALI pipeline decodes, resizes,
mixes, crops, flips and normalises each batch.

The loader core owns the plan, position, maps, ``on_error``, labels and device; every random choice
and the masks come from ``Loader.inputs``, fed in per batch through one ``fn.external_source``, so
the stream is ReferenceLoader's, except that DALI's
resize is not bit-identical to torchvision's (|diff| <= 1 grey level on the
digits). The mix itself is exact: given the canvases DALI decoded (returned as
``canvas``), ``mixed`` equals ``mix_backgrounds`` then ``crop_flip`` then
``normalize``, up to crop_mirror_normalize's float rounding (|diff| < 1e-5;
it computes (x - 255 m) / (255 s)).

Canvas modes: "stretch" resizes both sides; "center" resamples only CenterCrop's square of
torchvision's resized image (shorter side = canvas, from the file header; ``decode_to_canvas``), so
the canvas is within a grey level of ``to_canvas``'s. With ``--augment rrc`` the
crop is the sampler's box sliced from the (mixed) canvas and resized alone in
float (linear, no antialiasing): ``resized_crop_flip``'s arithmetic to 1e-4.
The canvas is an output of the pipeline only while the loader wants it (``Loader.wants_canvas``).

The mix as DALI ops (target i borrows from partner j = partners[i]):
  host     the top-k cells of each image's g x g map (``top_k_mask``; tiny), and for
           each image j the corner of the box it lends: the source corner of its borrower
  lent     image j cuts that box from its canvas and blanks its own foreground in it
           (nearest-upsampled mask; uint8 arithmetic on the box only), then
           ``permute_batch`` hands the box to its borrower
  mixed    ``multi_paste`` of two inputs: the target's canvas, then the lent box at
           the target's destination corner
A batch of one is left as it is, as the kernel does: its own box goes back in place.
"""
from __future__ import annotations

import logging
import os
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch

from backmix.osr_data.decode import DecodeError, decode_rgb, read_bytes, read_canvas
from backmix.osr_data.errors import BackMixError

from .augment import fill_value
from .core import Loader, Plan, Source, SourceBatch
from .dali_ops import PREFETCH, crop_normalize, crop_where, decode_to_canvas
from .loaders import check_backend_config

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
                return (data,) + source.pipeline_inputs(step, ids)
        raise StopIteration


class DaliSource(Source):
    """A fused source: one DALI pipeline decodes, mixes, crops, flips and normalises each batch.
    The loader's device: the pipeline runs on its GPU, or on the CPU."""

    name = "dali"
    kind = "fused"
    # What crops cut from the image would need: each image's size before its batch's draw (from the file
    # header), the boxes sliced from the decoded image (fn.decoders.image_slice) and the mix's lent box
    # resized to each target's box: the pipeline draws and mixes on canvases only.
    whole_images_refused = ("its pipeline draws the boxes before it decodes and mixes canvases only: it would "
                            "need each image's size from its header and the box sliced from the decoded image")

    def __init__(self, loader) -> None:
        super().__init__(loader)
        cfg = loader.config
        check_backend_config(self.name, cfg)
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

    def pipeline_inputs(self, step: int, ids: np.ndarray) -> tuple:
        """The batch's params (``Loader.inputs``) as DALI inputs (lists of numpy arrays)."""
        cfg, b = self.loader.config, len(ids)
        p, masks = self.loader.inputs(step, ids)
        out = (list(p.flips.astype(np.int32)),) + crop_where(p, cfg)
        if not cfg.backmix:
            return out
        src, dst = p.boxes[:, 0:2], p.boxes[:, 2:4]
        if b < 2:
            dst = src   # as the kernel, a lone image is left as it is: its own box pasted back in place
        # Image j lends its box to the target i with partners[i] == j, cut at that target's source corner.
        lend_at = np.empty_like(src)
        lend_at[p.partners] = src
        out_anchors = np.zeros((b, 2, 2), dtype=np.int32)    # paste 0: the canvas at (0, 0)
        out_anchors[:, 1] = dst                               # paste 1: the box at the destination
        return out + (list(masks.astype(np.uint8)[..., None]), list(p.partners.astype(np.int32)),
                      list(lend_at.astype(np.int32)), list(out_anchors))

    # ----------------------------------------------------------------- the pipeline


    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        cfg = self.loader.config
        s = cfg.canvas
        bh, bw = self.loader.sampler.box_hw
        # The canvas leaves the pipeline only when batches carry it: its transpose and copy out cost
        # about a tenth of a batch. An iteration that wants otherwise builds a new pipeline (``batches``).
        self._with_canvas = with_canvas = self.loader.wants_canvas
        gpu = self.gpu
        # Locals only: the pipeline keeps its definition, which must not hold the loader.
        feeder, fill_rgb = self._feeder, fill_value(cfg.mean).numpy().reshape(1, 1, 3)
        paste_shapes = np.array([[s, s], [bh, bw]], dtype=np.int32)   # the canvas, then the box
        cell = s // cfg.grid
        box_cells = types.Constant(np.array([bh / cell, bw / cell], dtype=np.float32))

        @pipeline_def(batch_size=cfg.batch_size, num_threads=max(1, cfg.num_workers),
                      device_id=self.loader.device.index if gpu else None,
                      prefetch_queue_depth=PREFETCH, seed=cfg.seed, exec_dynamic=True)
        def backmix_pipeline():
            n_in = 8 if cfg.backmix else 4
            inputs = fn.external_source(source=feeder, num_outputs=n_in, batch=True,
                                        layout=[""] * 4 + ["HWC", "", "", ""][:n_in - 4])
            files, flips, *where = inputs[:4]   # where: the crops' places (``crop_where``)
            canvas = decode_to_canvas(files, s, gpu, cfg.canvas_mode)

            outs = [fn.transpose(canvas, perm=[2, 0, 1])] if with_canvas else []
            if cfg.clean:
                outs.append(crop_normalize(canvas, flips, where, cfg))
            if cfg.backmix:
                masks, partners, lend_at, out_anchors = inputs[4:]
                if gpu:
                    masks = masks.gpu()
                one = types.Constant(1, dtype=types.UINT8)
                fill = types.Constant(fill_rgb, dtype=types.UINT8)
                # Each image cuts the box it lends (at its borrower's source corner) and blanks
                # its own foreground in it: box-sized work only, and no mask needs permuting.
                # The lent box of the nearest-upsampled mask, sampled straight from the g x g grid:
                # box pixel (y, x) reads cell floor((corner + (y, x) + 0.5) / cell), as the full resize would.
                corner = fn.cast(lend_at, dtype=types.FLOAT) / float(cell)
                fg = fn.resize(masks, size=[bh, bw], roi_start=corner, roi_end=corner + box_cells,
                               interp_type=types.INTERP_NN, antialias=False)
                rgb = fn.slice(canvas, lend_at, [bh, bw], axis_names="HW")
                lent = fn.permute_batch(rgb * (one - fg) + fill * fg, indices=partners)
                # Two pastes into one output: the target's canvas, then the borrowed box at its destination.
                mixed = fn.multi_paste(canvas, lent, shapes=types.Constant(paste_shapes),
                                       out_anchors=out_anchors, output_size=[s, s])
                outs.append(crop_normalize(mixed, flips, where, cfg))
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
