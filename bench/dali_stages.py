"""DALI's stages timed apart (``backmix bench loader``'s breakdown of the dali backend), each pipeline
built from the loader's own graph pieces (``dali_ops``, ``dali_graphs``): the canvas graph's whole
decode, canvas resize and crop, and the region graph's crops, which decode only their boxes' regions."""
from __future__ import annotations

import time

import numpy as np

from backmix.osr_data.index import ImageIndex
from backmix.pipeline.config import LoaderConfig, choose_device
from backmix.pipeline.dali import file_bytes_and_size
from backmix.pipeline.dali_ops import (PREFETCH, box_regions, canvas_rois, crop_normalize, crop_where,
                                       decode_regions, decode_to_canvas, decode_whole)


def stage_times(index: ImageIndex, config: LoaderConfig, batches: int) -> dict[str, float]:
    """Milliseconds per batch, each pipeline alone on the loader's files, threads and device. The canvas
    graph: ``decode_ms`` the whole decode, ``resize_ms`` the canvas resize after it, ``crop_ms`` the
    crop, flip and normalise after that (each the difference of a pipeline and the one before). The
    region graph: ``region_crop_ms`` the clean crops at the sampler's boxes, their regions decoded alone,
    resized, flipped and normalised (what a batch without canvases costs before the mix)."""
    from nvidia.dali import fn, pipeline_def, types

    device = choose_device(config.device)
    gpu = device.type == "cuda"
    b = config.batch_size
    rows = np.arange(min(len(index), b * max(1, batches)))
    files, sizes = zip(*(file_bytes_and_size(index.abspath(int(i))) for i in rows))
    sizes = np.array(sizes, dtype=np.int64)
    sampler = config.sampler()
    norm = {"mean": [255.0 * m for m in config.mean], "std": [255.0 * v for v in config.std],
            "dtype": types.FLOAT, "output_layout": "CHW"}
    out, n_inputs = {}, {"decode": 1, "canvas": 3, "canvas crops": 6, "region crops": 6}
    for stage in ("decode", "canvas", "canvas crops", "region crops"):
        def batch_inputs(info):
            start = (info.iteration * b) % len(files)
            at = [(start + k) % len(files) for k in range(b)]
            batch = [files[k] for k in at]
            if stage == "decode":   # the files alone: DALI warns of outputs a pipeline does not read
                return (batch,)
            hw = sizes[at]
            rois = canvas_rois(hw, config.canvas, config.canvas_mode)
            if stage == "canvas":
                return (batch,) + rois
            p = sampler.draw(b, 0, info.iteration, train=config.train)
            flips = (p.flips.astype(np.int32),)
            if stage == "canvas crops":
                return (batch,) + flips + crop_where(p, config) + rois
            box = np.concatenate([p.crops, p.crop_sizes], axis=1)
            return (batch,) + flips + box_regions(hw, [(box, config.crop)], config.canvas, config.canvas_mode)

        @pipeline_def(batch_size=b, num_threads=max(1, config.num_workers),
                      device_id=device.index if gpu else None,
                      prefetch_queue_depth=PREFETCH, exec_dynamic=True)
        def timing_pipeline():
            files_in, *rest = fn.external_source(source=batch_inputs, num_outputs=n_inputs[stage], batch=True,
                                                 batch_info=True)
            if stage == "decode":
                return decode_whole(files_in, gpu)
            if stage == "canvas":
                return decode_to_canvas(files_in, config.canvas, gpu, rest)
            if stage == "canvas crops":
                canvas = decode_to_canvas(files_in, config.canvas, gpu, rest[3:5])
                return crop_normalize(canvas, rest[0], rest[1:3], config)
            crop = decode_regions(files_in, rest[1:3], [(rest[3], rest[4], config.crop)], gpu)[0]
            return fn.crop_mirror_normalize(crop, mirror=rest[0], **norm)

        pipe = timing_pipeline()
        pipe.build()
        pipe.run()                                   # warm-up
        t = time.perf_counter()
        for _ in range(batches):
            pipe.run()
        out[stage] = 1e3 * (time.perf_counter() - t) / batches
        del pipe
    return {"decode_ms": out["decode"], "resize_ms": out["canvas"] - out["decode"],
            "crop_ms": out["canvas crops"] - out["canvas"], "region_crop_ms": out["region crops"]}
