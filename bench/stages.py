"""Where a loader's time goes, measured outside any loader: each torch stage alone on the same files
(``backmix bench loader``'s breakdown), and the decode ceiling, the fastest installed CPU image
decoder on the files already in memory, on all workers: no CPU loader that decodes these files can
beat it (FFCV can: it decodes the canvas-sized copies it stored once). Also what the files are
(their formats, from their headers), which every benchmark table names.
"""
from __future__ import annotations

import logging
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

log = logging.getLogger("backmix")


def decodable_files(index, limit: int, on_error: str = "raise") -> list[str]:
    """The first ``limit`` files of ``index`` that decode; one that does not raises ``DecodeError``
    (on_error "raise") or is left out with a warning ("skip")."""
    from backmix.osr_data.decode import DecodeError, decode_rgb
    files = []
    for i in range(min(limit, len(index))):
        try:
            decode_rgb(index.abspath(i))
        except DecodeError:
            if on_error == "raise":
                raise
            log.warning("skipped %s: it does not decode", index.abspath(i))
            continue
        files.append(index.abspath(i))
    return files


def stage_breakdown(index, config, batches: int, device: torch.device) -> dict[str, float]:
    """Milliseconds per batch of each torch stage, timed alone on the same files."""
    from backmix.cam_cache.maps import UniformMaps
    from backmix.osr_data.decode import decode_rgb, to_canvas

    from backmix.pipeline.augment import BackMix, Normalize, RandomCropFlip, RandomResizedCropFlip
    from backmix.pipeline.batch import same_crop_twice
    from backmix.osr_data.canvas_reads import CanvasDataset, collate_canvases

    b = config.batch_size
    # The canvas resize alone (torchvision, this process), to set beside DALI's.
    decoded = [decode_rgb(f) for f in decodable_files(index, b, config.on_error)]
    resize = []
    for _ in range(3):
        t = time.perf_counter()
        for image in decoded:
            to_canvas(image, config.canvas, config.canvas_mode)
        resize.append(time.perf_counter() - t)
    ds = CanvasDataset(index, config.canvas, config.canvas_mode)
    loader = torch.utils.data.DataLoader(ds, batch_size=b, num_workers=config.num_workers,
                                         collate_fn=collate_canvases, shuffle=False)
    decode, canvases = [], None
    t = time.perf_counter()
    for i, (canvas, *_rest) in enumerate(loader):
        decode.append(time.perf_counter() - t)
        canvases = canvas if canvases is None else canvases
        if i + 1 >= batches:
            break
        t = time.perf_counter()
    sampler = config.sampler()
    maps = torch.from_numpy(UniformMaps(len(index), config.grid).gather(np.arange(b)))
    mix, norm = BackMix(config.top_k_ratio, config.box_fraction, config.mean), Normalize(config.mean, config.std)
    crop = (RandomResizedCropFlip if config.resizes else RandomCropFlip)(config.crop)
    x = canvases.to(device)
    stages = {"mix": [], "augment": [], "host_to_device": []}
    for step in range(max(3, batches)):
        p = sampler.draw(len(x), 0, step).torch(device)
        t0 = time.perf_counter()
        mixed = mix(x, maps.to(device), p)
        sync(device)
        t1 = time.perf_counter()
        norm(crop(torch.cat([x, mixed]), same_crop_twice(p)))
        sync(device)
        t2 = time.perf_counter()
        stages["mix"].append(t1 - t0)
        stages["augment"].append(t2 - t1)
        if device.type == "cuda":
            pinned = canvases.pin_memory()
            t3 = time.perf_counter()
            pinned.to(device, non_blocking=True)
            sync(device)
            stages["host_to_device"].append(time.perf_counter() - t3)
    out = {"read_decode_ms": 1e3 * statistics.median(decode[1:] or decode),
           "canvas_resize_ms": 1e3 * statistics.median(resize) * b / len(decoded)}
    out.update({f"{k}_ms": 1e3 * statistics.median(v) for k, v in stages.items() if v})
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_ceiling(index, workers: int, limit: int = 256, on_error: str = "raise") -> dict:
    """images/s of each installed CPU image decoder on the same files (bytes in memory), ``workers``
    threads, and the files' formats as their headers say (a folder's suffixes may lie)."""
    files = decodable_files(index, limit, on_error)
    blobs = [open(f, "rb").read() for f in files]
    formats = file_formats(blobs)
    decoders: dict[str, Callable[[bytes], object]] = {}
    from torchvision.io import ImageReadMode, decode_image
    decoders["torchvision.io (libjpeg-turbo)"] = lambda b: decode_image(
        torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB)
    import io

    from PIL import Image
    decoders["PIL"] = lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
    try:
        import cv2
        cv2.setNumThreads(1)
        decoders["OpenCV"] = lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
    except ImportError:
        pass
    rates = {}
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for name, fn in decoders.items():
            list(pool.map(fn, blobs[:16]))  # warm-up
            t = time.perf_counter()
            list(pool.map(fn, blobs))
            rates[name] = len(blobs) / (time.perf_counter() - t)
    best = max(rates, key=rates.get)
    return {"decoder": best, "images_per_s": rates[best], "threads": max(1, workers), "all": rates,
            "formats": formats}


def file_formats(blobs: list[bytes]) -> dict[str, int]:
    """{format name as PIL reads it from the header: count}, most common first."""
    import io

    from PIL import Image
    counts: dict[str, int] = {}
    for b in blobs:
        with Image.open(io.BytesIO(b)) as im:   # reads the header only
            counts[im.format or "unknown"] = counts.get(im.format or "unknown", 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def describe_input(images: int, formats: dict[str, int]) -> str:
    """'1024 images (JPEG)' or '300 images (PNG 200, JPEG 100 of 300 sampled)', from file_formats."""
    sampled = sum(formats.values())
    if len(formats) == 1:
        return f"{images} images ({next(iter(formats))})"
    kinds = ", ".join(f"{k} {v}" for k, v in formats.items())
    return f"{images} images ({kinds} of {sampled} sampled)"


