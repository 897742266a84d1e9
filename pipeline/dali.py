"""The DALI loader: decode, resize, BackMix, crop, flip and normalise as one DALI pipeline.

Samples, their order and every random choice come from the shared samplers
(``EpochSampler``, ``BackMixSampler``), fed in per batch through one
``fn.external_source``, so the stream is ReferenceLoader's, except that DALI's
resize is not bit-identical to torchvision's (|diff| <= 1 grey level on the
digits). The mix itself is exact: given the canvases DALI decoded (returned as
``canvas``), ``mixed`` equals ``mix_backgrounds`` then ``crop_flip`` then
``normalize``, up to crop_mirror_normalize's float rounding (|diff| < 1e-5;
it computes (x - 255 m) / (255 s)).

Canvas modes: "stretch" resizes both sides; "center" resizes to torchvision's size
(shorter side = canvas, from the file header) and slices CenterCrop's square, so
the canvas is within a grey level of ``to_canvas``'s. With ``--augment rrc`` the
crop is the sampler's box sliced from the (mixed) canvas and resized alone in
float (linear, no antialiasing): ``resized_crop_flip``'s arithmetic to 1e-4.

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
import time
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch

from backmix.cam_cache.maps import ForegroundMaps
from backmix.osr_data.decode import DecodeError, decode_rgb
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.index import ImageIndex

from .augment import fill_value
from .batch import BackMixBatch, host_masks
from .config import LoaderConfig, LoaderPosition, loader_inputs

log = logging.getLogger("backmix")

PREFETCH = 2

# A forked child (a torch DataLoader worker, say) inherits DALI pipeline objects but not
# their threads; destroying one there waits forever on the executor's condition variables.
# So a child keeps every pipeline it inherited alive and never runs their destructors.
_LIVE_PIPELINES: "weakref.WeakSet" = weakref.WeakSet()
_INHERITED: list = []


def _keep_in_children() -> None:
    _INHERITED.extend(list(_LIVE_PIPELINES))


os.register_at_fork(after_in_child=_keep_in_children)


@dataclass
class _Fed:
    """What the host knows about one batch it handed to the pipeline."""
    step: int
    ids: np.ndarray                                    # dataset indices of the samples fed
    failed: list[str] = field(default_factory=list)    # paths dropped before feeding (unreadable)
    plan: list = field(default_factory=list)           # the (step, ids) it came from, to replay it


class _Feeder:
    """The external_source callback: one call = the next batch of the epoch, as DALI inputs.

    It reads the batch's file bytes (on the loader's ``readers`` thread pool, one
    thread per worker) and draws the batch's params on the host; everything
    per-pixel happens in the pipeline. ``fed`` lists what is inside the pipeline,
    in order, so each output can be matched to its batch.
    """

    def __init__(self, loader: "DaliLoader") -> None:
        # Weak: the pipeline holds this callback, and a loader <-> pipeline cycle would leave the
        # pipeline to the cyclic GC, which may run in a forked child (see _keep_in_children).
        self._loader = weakref.ref(loader)
        self.plan: deque[tuple[int, np.ndarray]] = deque()   # (step, dataset ids) still to feed
        self.fed: deque[_Fed] = deque()
        self.trailing: list[str] = []    # failures of whole batches after the last fed one
        self.epoch = 0

    def start(self, epoch: int, plan: list[tuple[int, np.ndarray]]) -> None:
        self.epoch, self.plan, self.fed, self.trailing = epoch, deque(plan), deque(), []

    def stop(self) -> None:
        self.plan.clear()

    def __call__(self):
        ld = self._loader()
        if ld is None:
            raise StopIteration
        failed: list[str] = []
        consumed = []
        while self.plan:
            step, ids = self.plan.popleft()
            consumed.append((step, ids))
            data, good = [], []
            rows = ids.tolist()
            # The batch's files are read in parallel (file reads release the GIL), in the batch's order.
            raws = ld.readers.map(lambda i: None if i in ld.bad_rows else read_file(ld.index.abspath(i)), rows)
            for i, raw in zip(rows, raws):
                if raw is None:
                    ld.bad_rows.add(i)
                    failed.append(ld.index.abspath(i))
                    continue
                data.append(raw)
                good.append(i)
            if not good:   # the whole batch failed: its step is used up, as in the reference
                continue
            ids = np.asarray(good, dtype=np.int64)
            self.fed.append(_Fed(step, ids, failed, consumed))
            return (data,) + ld.batch_inputs(ids, self.epoch, step)
        self.trailing = failed
        raise StopIteration


def read_file(path: str) -> Optional[np.ndarray]:
    """The bytes of one file, or None when it cannot be read or is empty."""
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None
    return raw if raw.size else None


def round_half_even(x):
    """Python's round() of a DALI float that is a whole or a half number (as torchvision's CenterCrop)."""
    from nvidia.dali import math as dmath

    whole = dmath.floor(x)
    half = 2.0 * (x - whole)                      # 1 for a half number, else 0
    odd = whole - 2.0 * dmath.floor(whole / 2.0)  # 1 when ``whole`` is odd
    return whole + half * odd


def decode_to_canvas(files, size: int, gpu: bool, mode: str = "center", stages: str = "decode,resize"):
    """DALI ops: encoded files -> uint8 HWC canvases of size x size, antialiased, in canvas ``mode`` as
    ``osr_data.decode.to_canvas``: "stretch" resizes both sides; "center" resizes the shorter side to
    ``size`` and the longer to torchvision's int(size * long / short) (from the file's header), then
    slices the centre square at torchvision CenterCrop's corner. stages="decode" stops after decoding
    (for the benchmark)."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    # adjust_orientation=False: pixels as stored, as the reference loader decodes them (EXIF not applied)
    images = fn.decoders.image(files, device="mixed" if gpu else "cpu", output_type=types.RGB, adjust_orientation=False)
    if stages == "decode":
        return images
    if mode == "stretch":
        return fn.resize(images, size=[size, size], mode="stretch", antialias=True,
                         interp_type=types.INTERP_LINEAR)
    shape = fn.peek_image_shape(files, adjust_orientation=False)   # H, W, C on the host, from the header
    h, w = fn.cast(shape[0], dtype=types.FLOAT), fn.cast(shape[1], dtype=types.FLOAT)
    # The shorter side becomes ``size`` exactly; max() picks it without a branch per sample.
    new_h = dmath.max(dmath.floor(size * h / w), float(size))
    new_w = dmath.max(dmath.floor(size * w / h), float(size))
    resized = fn.resize(images, size=fn.stack(new_h, new_w), antialias=True, interp_type=types.INTERP_LINEAR)
    corner = fn.stack(round_half_even((new_h - size) / 2.0), round_half_even((new_w - size) / 2.0))
    return fn.slice(resized, corner, types.Constant(np.array([size, size], dtype=np.float32)),
                    axis_names="HW", normalized_anchor=False, normalized_shape=False)


def stage_times(index: ImageIndex, config: LoaderConfig, batches: int) -> dict[str, float]:
    """Milliseconds per batch of DALI's decode and of its canvas resize, each pipeline alone on the
    loader's files, threads and device (the resize is the difference of the two)."""
    from nvidia.dali import fn, pipeline_def

    gpu = torch.cuda.is_available() and config.device != "cpu"
    b = config.batch_size
    rows = np.arange(min(len(index), b * max(1, batches)))
    files = [np.fromfile(index.abspath(int(i)), dtype=np.uint8) for i in rows]
    out = {}
    for stages in ("decode", "decode,resize"):
        def batches_of_files(info):
            start = (info.iteration * b) % len(files)
            return [files[(start + k) % len(files)] for k in range(b)]

        @pipeline_def(batch_size=b, num_threads=max(1, config.num_workers),
                      device_id=torch.cuda.current_device() if gpu else None,
                      prefetch_queue_depth=PREFETCH, exec_dynamic=True)
        def timing_pipeline():
            files_in = fn.external_source(source=batches_of_files, batch=True, batch_info=True)
            return decode_to_canvas(files_in, config.canvas, gpu, config.canvas_mode, stages)

        pipe = timing_pipeline()
        pipe.build()
        pipe.run()                                   # warm-up
        t = time.perf_counter()
        for _ in range(batches):
            pipe.run()
        out[stages] = 1e3 * (time.perf_counter() - t) / batches
        del pipe
    return {"decode_ms": out["decode"], "resize_ms": out["decode,resize"] - out["decode"]}


class DaliLoader(LoaderPosition):
    """Yields ``BackMixBatch`` for the images ``indices`` (default: all) of ``index``, from a DALI pipeline."""

    backend = "dali"

    def __init__(self, index: ImageIndex, config: LoaderConfig, maps: Optional[ForegroundMaps] = None,
                 indices: Optional[np.ndarray] = None, label_map: Optional[np.ndarray] = None) -> None:
        if config.auto_augment != "none" and config.train:
            raise BackMixError("auto_augment runs in the torch batch transform: use the reference, torchvision, ffcv or ray loader")
        self.index, self.config = index, config
        self.maps, self.dataset_indices, self.epoch_sampler, self.row_labels = loader_inputs(
            index, config, maps, indices, label_map)
        self.sampler = config.sampler()
        self.fill = fill_value(config.mean).numpy()
        self.gpu = torch.cuda.is_available() and config.device != "cpu"
        if config.device == "cuda" and not self.gpu:
            log.warning("CUDA was asked for but is not available; DALI runs on the CPU")
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.gpu else torch.device("cpu")
        log.info("DALI pipeline on %s", "gpu" if self.gpu else "cpu")
        self._start_position()
        self.bad_rows: set[int] = set()    # rows known not to decode: dropped at feed time from then on
        self.readers = ThreadPoolExecutor(max(1, config.num_workers), thread_name_prefix="backmix-read")
        self._feeder = _Feeder(self)
        self._pipe = self._build()
        self._dirty = False                # an epoch was left part-way: the pipeline holds stale batches

    # ----------------------------------------------------------------- host side

    def batch_inputs(self, ids: np.ndarray, epoch: int, step: int) -> tuple:
        """The per-sample params of one batch as DALI inputs (lists of numpy arrays)."""
        cfg, b = self.config, len(ids)
        p = self.sampler.draw(b, epoch, step, cfg.rank, train=cfg.train)
        crops, flips = p.crops, p.flips
        # crop_mirror_normalize takes the crop corner as a fraction of the free range; it
        # rounds fraction * range back to the integer corner exactly (checked by the tests).
        free = max(cfg.canvas - cfg.crop, 1)
        if cfg.resizes:
            # The resized crop's box: its corner and its height x width in the canvas.
            where = (list(crops.astype(np.float32)), list(p.crop_sizes.astype(np.float32)))
        else:
            pos = (crops / free).astype(np.float32)
            where = (list(pos[:, 1]), list(pos[:, 0]))
        out = (list(flips.astype(np.int32)),) + where
        if not cfg.backmix:
            return out
        src, dst = p.boxes[:, 0:2], p.boxes[:, 2:4]
        if b < 2:
            # The kernel leaves a lone image as it is: its own box pasted back in place, nothing blanked.
            masks = np.zeros((b, cfg.grid, cfg.grid, 1), dtype=np.uint8)
            dst = src
        else:
            masks = host_masks(self.maps, ids, self.sampler.top_k_ratio, p.tie_break).astype(np.uint8)[..., None]
        # Image j lends its box to the target i with partners[i] == j, cut at that target's source corner.
        lend_at = np.empty_like(src)
        lend_at[p.partners] = src
        out_anchors = np.zeros((b, 2, 2), dtype=np.int32)    # paste 0: the canvas at (0, 0)
        out_anchors[:, 1] = dst                               # paste 1: the box at the destination
        return out + (list(masks), list(p.partners.astype(np.int32)),
                      list(lend_at.astype(np.int32)), list(out_anchors))

    # ----------------------------------------------------------------- the pipeline

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        cfg = self.config
        s, c = cfg.canvas, cfg.crop
        bh, bw = self.sampler.box_hw
        gpu, resizes = self.gpu, cfg.resizes
        names = ["canvas"] + (["images"] if cfg.clean else []) + (["mixed"] if cfg.backmix else [])
        mean = [255.0 * m for m in cfg.mean]
        std = [255.0 * v for v in cfg.std]
        # Locals only: the pipeline keeps its definition, which must not hold the loader.
        feeder, fill_rgb = self._feeder, self.fill.reshape(1, 1, 3)
        paste_shapes = np.array([[s, s], [bh, bw]], dtype=np.int32)   # the canvas, then the box
        cell = s // cfg.grid
        box_cells = types.Constant(np.array([bh / cell, bw / cell], dtype=np.float32))

        @pipeline_def(batch_size=cfg.batch_size, num_threads=max(1, cfg.num_workers),
                      device_id=torch.cuda.current_device() if gpu else None,
                      prefetch_queue_depth=PREFETCH, seed=cfg.seed, exec_dynamic=True)
        def backmix_pipeline():
            n_in = 8 if cfg.backmix else 4
            inputs = fn.external_source(source=feeder, num_outputs=n_in, batch=True,
                                        layout=[""] * 4 + ["HWC", "", "", ""][:n_in - 4])
            # where: the crop corner as fractions of the free range (x, y); with resizes the box's
            # corner and size instead.
            files, flips, *where = inputs[:4]
            canvas = decode_to_canvas(files, s, gpu, cfg.canvas_mode)

            def crop_norm(x):
                if resizes:
                    # The box sliced, then resized alone (so its edge pixels are clamped at the box, as
                    # in the torch op), in float: resized_crop_flip, then mirror and normalise.
                    box = fn.slice(x, where[0], where[1], axis_names="HW", normalized_anchor=False,
                                   normalized_shape=False)
                    x = fn.resize(box, size=[c, c], interp_type=types.INTERP_LINEAR, antialias=False,
                                  dtype=types.FLOAT)
                    return fn.crop_mirror_normalize(x, mirror=flips, mean=mean, std=std, dtype=types.FLOAT,
                                                    output_layout="CHW")
                return fn.crop_mirror_normalize(x, crop=(c, c), crop_pos_x=where[0], crop_pos_y=where[1],
                                                mirror=flips, mean=mean, std=std, dtype=types.FLOAT,
                                                output_layout="CHW")

            outs = [fn.transpose(canvas, perm=[2, 0, 1])] + ([crop_norm(canvas)] if cfg.clean else [])
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
                outs.append(crop_norm(mixed))
            return tuple(outs)

        pipe = backmix_pipeline()
        pipe.build()
        _LIVE_PIPELINES.add(pipe)
        self._names = names
        return pipe

    def _rebuild(self) -> None:
        self._pipe = self._build()

    # ----------------------------------------------------------------- iteration

    def _settle(self) -> None:
        """Make the pipeline ready for a new epoch after one that was left part-way."""
        if not self._dirty:
            return
        self._feeder.stop()
        try:
            for _ in range(PREFETCH + 1):
                self._pipe.run()
        except StopIteration:
            self._pipe.reset()
        except Exception:   # noqa: BLE001 - a stale batch failing does not matter; start afresh
            self._rebuild()
        else:
            self._rebuild()
        self._dirty = False

    def __iter__(self) -> Iterator[BackMixBatch]:
        self._settle()
        self.maps.refresh()   # a new cache generation takes effect at an epoch boundary
        self._feeder.start(self.epoch, self.epoch_plan())
        self._dirty = True
        while True:
            try:
                outs = self._pipe.run()
            except StopIteration:
                self._report(self._feeder.trailing)
                self._pipe.reset()
                self._dirty = False
                self.next_step = len(self)
                return
            except RuntimeError as e:
                self._recover(e)
                continue
            fed = self._feeder.fed.popleft()
            self._report(fed.failed)
            self.next_step = fed.step + 1
            yield self.deliver(self._to_batch(outs, fed))

    def _report(self, failed: list[str]) -> None:
        if not failed:
            return
        if self.config.on_error == "raise":
            self._dirty = True
            raise DecodeError(failed[0])
        self.skipped += len(failed)
        for path in failed:
            log.warning("skipped %s: it does not decode (%d skipped so far)", path, self.skipped)

    def _recover(self, error: RuntimeError) -> None:
        """DALI failed on the oldest batch in flight: name the file(s), then raise or re-run without them."""
        feeder = self._feeder
        if not feeder.fed:
            raise error
        fed = feeder.fed[0]
        bad = [int(i) for i in fed.ids if not _decodes(self.index.abspath(int(i)))]
        if not bad:
            why = " ".join(str(error).split())[:300] or type(error).__name__
            raise BackMixError(f"DALI failed on batch {fed.step} ({len(fed.ids)} images, all of which "
                               f"torchvision decodes): {why}")
        self.bad_rows.update(bad)
        if self.config.on_error == "raise":
            self._dirty = True
            # Name the batch's first failing file, as the reference does, whichever way it failed.
            failing = set(fed.failed) | {self.index.abspath(i) for i in bad}
            batch = [self.index.abspath(int(i)) for i in fed.plan[-1][1]]
            raise DecodeError(next(path for path in batch if path in failing))
        # Re-feed this batch and everything after it; the bad rows are now dropped at feed time.
        # A fresh pipeline: the old one may hold half-run state after the failure.
        # Files dropped at feed time are found again on the replay, so nothing is counted twice.
        replay = [item for f in feeder.fed for item in f.plan]
        feeder.start(feeder.epoch, replay + list(feeder.plan))
        self._rebuild()

    def _to_batch(self, outs, fed: _Fed) -> BackMixBatch:
        out = {name: self._to_torch(tl, torch.uint8 if name == "canvas" else torch.float32)
               for name, tl in zip(self._names, outs)}
        return BackMixBatch(out["canvas"], out.get("images"), out.get("mixed"),
                            *self.row_labels.take(fed.ids, self.device))

    def _to_torch(self, tl, dtype: torch.dtype) -> torch.Tensor:
        if not self.gpu:
            # Zero-copy: under DALI's dynamic executor an output owns its memory, which stays
            # valid while referenced (the numpy view keeps the DALI tensor alive), so there is
            # no need to copy ~30 MB a batch on the host.
            return torch.from_numpy(np.asarray(tl.as_tensor()))
        from nvidia.dali.plugin.pytorch import feed_ndarray
        t = tl.as_tensor()
        out = torch.empty(tuple(t.shape()), dtype=dtype, device=self.device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device))
        return out


def _decodes(path: str) -> bool:
    try:
        decode_rgb(path)
        return True
    except DecodeError:
        return False
