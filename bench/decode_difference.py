"""How far the device decode's canvases are from the reference decode's (``pipeline/device_decode.py``
against ``decode_canvas``): a measurement, never on a loader's path."""
from __future__ import annotations

import numpy as np
import torch

from backmix.pipeline.device_decode import jpeg_canvases


def decode_difference(index, rows, size: int, mode: str, device, batch_size: int = 64) -> dict:
    """How far the device decode's canvases on ``device`` are from the reference decode's (``decode_canvas`` on
    the CPU), over the JPEGs among ``rows`` of ``index``: the largest and the mean absolute difference in
    levels (0-255) and the 99.9th percentile. What tests/test_cuda.py bounds and scripts/gpu-check.sh
    records. (A measurement: it reads the canvases back to the host, as no loader does.)"""
    from backmix.osr_data.decode import decode_canvas, is_jpeg, read_bytes

    device = torch.device(device)
    diffs = []
    for start in range(0, len(rows), batch_size):
        paths = [index.abspath(int(i)) for i in rows[start:start + batch_size]]
        blobs = [read_bytes(p) for p in paths]
        jpegs = [(b, p) for b, p in zip(blobs, paths) if is_jpeg(b)]
        canvases = jpeg_canvases([b for b, _ in jpegs], [p for _, p in jpegs], size, mode, device)
        for canvas, (_, path) in zip(canvases, jpegs):
            if canvas is not None:
                diffs.append((canvas.cpu().int() - decode_canvas(path, size, mode).int()).abs().flatten())
    if not diffs:
        return {"images": 0}
    d = torch.cat(diffs).numpy()
    return {"images": len(diffs), "device": str(device), "canvas": size, "canvas_mode": mode,
            "max_abs": int(d.max()), "mean_abs": float(d.mean()), "p999_abs": float(np.percentile(d, 99.9))}
