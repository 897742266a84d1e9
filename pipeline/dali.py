"""The DALI backend: a fused source (``pipeline/core.py``) whose one DALI pipeline decodes, mixes,
crops, flips and normalises each batch.

The loader core owns the plan, position, maps, ``on_error``, labels and device; every random choice
and the masks come from ``LoaderView.inputs``, fed in per batch through one ``fn.external_source``. The
pipeline is one of two graphs (``dali_graphs``): while canvases are made (batches carry them, or an
in-loop rebuild reads them) the crops are cut from them, the reference's arithmetic on DALI's
canvases; otherwise each crop decodes only its box's image region and resizes it once, within a
stated bound of the reference's stream (the bounds: tests/test_dali.py). CPU and GPU ("mixed"
decoder) run the same graphs.
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

from backmix.osr_data.decode import DecodeError, check_pixels, decode_rgb, read_bytes, read_canvas
from backmix.osr_data.errors import BackMixError

from .core import Loader, Plan, Source, SourceBatch
from .dali_graphs import choose_graph
from .dali_ops import PREFETCH
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


def file_bytes_and_size(path: str, size: int = 0, mode: str = "") -> tuple[np.ndarray, tuple[int, int]]:
    """``read_canvas``'s "decode" for DALI: the file's bytes (the graph decodes them) and its stored
    (height, width) from the header, which the graph's geometry needs; an image over the pixel limits is
    refused here, from the header, as the other loaders refuse it (``check_pixels``). A header that
    names no size gives (1, 1): DALI then fails on the file and the replay names it."""
    data = read_bytes(path).numpy()
    return data, check_pixels(path, data) or (1, 1)


class _Feeder:
    """The external_source callback: one call = the next batch of the plan, as DALI inputs.

    It reads the batch's files with the one checked read (``read_canvas``: a file missing or changed
    since indexing is an error the core raises) on the source's ``readers`` pool, one thread per
    worker, and takes the batch's params and masks from ``LoaderView.inputs``; every pixel is DALI's."""

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
            # Read in parallel (file reads release the GIL), kept in the batch's order: one run of rows
            # per reader thread, as a task per file costs more than reading a cached file.
            parts = source.readers.map(lambda part: [source.read(i) for i in part.tolist()],
                                       np.array_split(planned, source.n_readers))
            reads = [raw for part in parts for raw in part]
            good, data, sizes, failed = [], [], [], []
            for i, raw in zip(rows, reads):
                if isinstance(raw, Exception):
                    failed.append(raw)
                else:
                    good.append(i)
                    data.append(raw[0])
                    sizes.append(raw[1])
            ids = np.asarray(good, dtype=np.int64)
            self.fed.append(_Fed(step, planned, ids, failed))
            if good:   # DALI takes no empty batch: a step none of whose files could be read is not fed
                return (data,) + source.pipeline_inputs(step, ids, np.asarray(sizes, dtype=np.int64))
        raise StopIteration


class DaliSource(Source):
    """A fused source: one DALI pipeline decodes, mixes, crops, flips and normalises each batch.
    The loader's device: the pipeline runs on its GPU, or on the CPU."""

    name = "dali"
    kind = "fused"
    whole_images_refused = None   # crops cut from the image: the boxes are image regions, decoded as any box

    def __init__(self, index, config, device) -> None:
        super().__init__(index, config, device)
        cfg = config
        check_backend_config(self.name, cfg)
        self.gpu = device.type == "cuda"
        log.info("DALI pipeline on %s", "gpu" if self.gpu else "cpu")
        # Rows DALI failed to decode, with torchvision's error (the reference's message): dropped at feed time from then on.
        self.bad_rows: dict[int, DecodeError] = {}
        self.n_readers = max(1, cfg.num_workers)
        self.readers = ThreadPoolExecutor(self.n_readers, thread_name_prefix="backmix-read")
        self._feeder = _Feeder(self)

    def open(self, rows, view) -> None:
        super().open(rows, view)
        self._pipe = self._build()
        self._clean = True   # the pipeline holds no batch of an earlier iteration

    def read(self, row: int):
        """The bytes of dataset row ``row``, or the error that makes it fail (``read_canvas``'s "return")."""
        index, cfg = self.index, self.config
        if row in self.bad_rows:
            return self.bad_rows[row]
        return read_canvas(index, row, cfg.canvas, cfg.canvas_mode, "return", file_bytes_and_size)

    def pipeline_inputs(self, step: int, ids: np.ndarray, sizes: np.ndarray) -> tuple:
        """The batch's params and masks (``LoaderView.inputs``) as the current graph's DALI inputs.
        ``sizes``: int [B, 2], each image's stored size; crops cut from the image are drawn in it."""
        p, masks = self.view.inputs(step, ids, sizes if self.config.crops_images else None)
        return self._graph.inputs(p, masks, sizes)

    # ----------------------------------------------------------------- the pipeline

    def _build(self):
        from nvidia.dali import fn, pipeline_def

        cfg = self.config
        # The canvas leaves the pipeline only when batches carry it: making it and copying it out cost
        # about a batch's crops. An iteration that wants otherwise builds a new pipeline (``batches``).
        self._with_canvas = self.view.wants_canvas
        # Locals only: the pipeline keeps its definition, which must not hold the loader.
        self._graph = graph = choose_graph(cfg, self.view.box_hw, self.gpu, self._with_canvas)
        feeder = self._feeder

        @pipeline_def(batch_size=cfg.batch_size, num_threads=max(1, cfg.num_workers),
                      device_id=self.device.index if self.gpu else None,
                      prefetch_queue_depth=PREFETCH, seed=cfg.seed, exec_dynamic=True)
        def backmix_pipeline():
            files, *inputs = fn.external_source(source=feeder, num_outputs=1 + graph.n_inputs(), batch=True,
                                                layout=[""] + graph.layout())
            return graph.outputs(files, inputs)

        pipe = backmix_pipeline()
        pipe.build()
        _LIVE_PIPELINES.add(pipe)
        return pipe

    # ----------------------------------------------------------------- iteration

    def batches(self, plan: Plan) -> Iterator[SourceBatch]:
        if not self._clean or self._with_canvas != self.view.wants_canvas:
            # An iteration left part-way: DALI has pulled batches of it ahead, which a reset cannot drop;
            # or the canvas is wanted now and was not (an in-loop rebuild attached), or the other way round.
            self._pipe = self._build()
        feeder = self._feeder
        feeder.start(plan)
        self._clean = False
        while True:
            if self.view.wants_canvas and not self._with_canvas:
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
            cfg = self.config
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
        index = self.index
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
        device = self.device
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
