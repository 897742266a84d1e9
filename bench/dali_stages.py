"""DALI's stages timed apart (``backmix bench loader``'s breakdown of the dali backend): its decode, its
canvas resize and its crop, each pipeline built from the loader's own graph pieces (``dali_ops``)."""
from __future__ import annotations

import time

import numpy as np

from backmix.osr_data.index import ImageIndex
from backmix.pipeline.config import LoaderConfig, choose_device
from backmix.pipeline.dali_ops import PREFETCH, crop_normalize, crop_where, decode_to_canvas


def stage_times(index: ImageIndex, config: LoaderConfig, batches: int) -> dict[str, float]:
    """Milliseconds per batch of DALI's decode, its canvas resize and its crop (crop, flip, normalise,
    at the sampler's boxes), each pipeline alone on the loader's files, threads and device; a stage's
    time is the difference of the pipelines up to it and up to the one before."""
    from nvidia.dali import fn, pipeline_def

    device = choose_device(config.device)
    gpu = device.type == "cuda"
    b = config.batch_size
    rows = np.arange(min(len(index), b * max(1, batches)))
    files = [np.fromfile(index.abspath(int(i)), dtype=np.uint8) for i in rows]
    sampler = config.sampler()
    out = {}
    for stages in ("decode", "decode,resize", "decode,resize,crop"):
        crops = stages.endswith("crop")

        def batch_inputs(info):
            start = (info.iteration * b) % len(files)
            batch = [files[(start + k) % len(files)] for k in range(b)]
            if not crops:   # the files alone: DALI warns of outputs a pipeline does not read
                return (batch,)
            p = sampler.draw(b, 0, info.iteration, train=config.train)
            return (batch, list(p.flips.astype(np.int32)), *crop_where(p, config))

        @pipeline_def(batch_size=b, num_threads=max(1, config.num_workers),
                      device_id=device.index if gpu else None,
                      prefetch_queue_depth=PREFETCH, exec_dynamic=True)
        def timing_pipeline():
            files_in, *rest = fn.external_source(source=batch_inputs, num_outputs=4 if crops else 1, batch=True,
                                                 batch_info=True)
            canvas = decode_to_canvas(files_in, config.canvas, gpu, config.canvas_mode, stages)
            return crop_normalize(canvas, rest[0], rest[1:], config) if crops else canvas

        pipe = timing_pipeline()
        pipe.build()
        pipe.run()                                   # warm-up
        t = time.perf_counter()
        for _ in range(batches):
            pipe.run()
        out[stages] = 1e3 * (time.perf_counter() - t) / batches
        del pipe
    return {"decode_ms": out["decode"], "resize_ms": out["decode,resize"] - out["decode"],
            "crop_ms": out["decode,resize,crop"] - out["decode,resize"]}
