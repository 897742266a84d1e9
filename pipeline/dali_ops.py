"""DALI graph pieces the loader and the benchmark share: the decode to a canvas as DALI ops
(``decode_to_canvas``, torchvision's canvas within a grey level), and per-stage timings."""
from __future__ import annotations

import time

import numpy as np

from backmix.osr_data.index import ImageIndex

from .config import LoaderConfig, choose_device

PREFETCH = 2   # DALI's prefetch queue depth: batches it pulls from the external source ahead of the consumer


def round_half_even(x):
    """Python's round() of a DALI float that is a whole or a half number (as torchvision's CenterCrop)."""
    from nvidia.dali import math as dmath

    whole = dmath.floor(x)
    half = 2.0 * (x - whole)                      # 1 for a half number, else 0
    odd = whole - 2.0 * dmath.floor(whole / 2.0)  # 1 when ``whole`` is odd
    return whole + half * odd


def decode_to_canvas(files, size: int, gpu: bool, mode: str = "center", stages: str = "decode,resize"):
    """DALI ops: encoded files -> uint8 HWC canvases of size x size, antialiased, in canvas ``mode`` as
    ``osr_data.decode.to_canvas``: "stretch" resizes both sides; "center" is torchvision's Resize (the
    shorter side to ``size``, the longer to int(size * long / short), from the file's header) then
    CenterCrop, computed as one resize of the centre square's source region: only the canvas's pixels
    are resampled (the longer side's cut-off ends never are). stages="decode" stops after decoding
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
    hw = fn.cast(shape[0:2], dtype=types.FLOAT)
    h, w = hw[0], hw[1]
    # The shorter side becomes ``size`` exactly; max() picks it without a branch per sample.
    resized = fn.stack(dmath.max(dmath.floor(size * h / w), float(size)),
                       dmath.max(dmath.floor(size * w / h), float(size)))
    corner = round_half_even((resized - size) / 2.0)   # CenterCrop's, in the resized image
    # The same sampling positions as resizing the whole image to ``resized`` and slicing the square
    # (within float rounding: a pixel may differ by one grey level, well inside the resize's tolerance).
    scale = hw / resized
    return fn.resize(images, size=[size, size], roi_start=corner * scale, roi_end=(corner + size) * scale,
                     roi_relative=False, antialias=True, interp_type=types.INTERP_LINEAR)


def stage_times(index: ImageIndex, config: LoaderConfig, batches: int) -> dict[str, float]:
    """Milliseconds per batch of DALI's decode and of its canvas resize, each pipeline alone on the
    loader's files, threads and device (the resize is the difference of the two)."""
    from nvidia.dali import fn, pipeline_def

    device = choose_device(config.device)
    gpu = device.type == "cuda"
    b = config.batch_size
    rows = np.arange(min(len(index), b * max(1, batches)))
    files = [np.fromfile(index.abspath(int(i)), dtype=np.uint8) for i in rows]
    out = {}
    for stages in ("decode", "decode,resize"):
        def batches_of_files(info):
            start = (info.iteration * b) % len(files)
            return [files[(start + k) % len(files)] for k in range(b)]

        @pipeline_def(batch_size=b, num_threads=max(1, config.num_workers),
                      device_id=device.index if gpu else None,
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
