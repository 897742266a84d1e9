"""The torchvision backend: workers read JPEG bytes, the trainer's device decodes and mixes them.

Named after what it needs: torch and torchvision alone (no DALI, FFCV or Ray),
as the other backends are named after the library they bring. It is the
reference loader (same plan, position and resume, shards, closed-set labels,
``on_error``) with decoding moved: DataLoader workers only read each file's
bytes, which is cheap; the main process decodes the batch's JPEGs in one
``torchvision.io.decode_jpeg`` call on the loader's device (nvjpeg on a GPU),
makes the canvases there (``device_decode``) and hands them to the same
``BatchTransform`` (mix, crop or RandomResizedCrop, flip, normalise). No pixel
goes to the host between the decode and the model input. Files of other
formats (PNG, BMP, WebP) are decoded to canvases by the workers on the CPU, as
the reference loader does, and join the batch on the device.

On the CPU its stream equals the reference loader's bit for bit (the same
libjpeg-turbo decode and the same resize); on a GPU nvjpeg and the GPU resize
may differ by a few levels per pixel (``tests/test_cuda.py`` holds the bound).

When the crops are cut from the whole image (``LoaderConfig.crops_images``) the
workers hand on every file's bytes; the loading process decodes them (JPEGs on
the device, the other formats on the CPU), keeps the whole images (``Photos``)
and makes the canvases from them, where they are.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from backmix.osr_data.canvas_reads import pad_photos
from backmix.osr_data.decode import DecodeError, check_pixels, decode_rgb_bytes, is_jpeg, read_bytes, to_canvas

from .batch import to_device
from .device_decode import canvases_of, decode_on_device, jpeg_canvases
from .reference import TransformingDataset, WorkerSource


def encoded_or_canvas(path: str, size: int, mode: str) -> torch.Tensor:
    """What a worker reads per file: a JPEG's bytes (uint8 [N], decoded later on the device), any other
    format's canvas (uint8 [3, S, S], decoded here)."""
    data = read_bytes(path)
    if is_jpeg(data):
        check_pixels(path, data.numpy())   # the header only: no gigapixel decode on the device
        return data
    return to_canvas(decode_rgb_bytes(data, path), size, mode)


def encoded(path: str, size: int, mode: str) -> torch.Tensor:
    """What a worker reads per file when the crops are cut from the whole image: its bytes (uint8 [N]),
    whatever the format, its size checked from the header."""
    data = read_bytes(path)
    check_pixels(path, data.numpy())
    return data


class EncodedBatch(NamedTuple):
    """A batch as workers hand it on: every JPEG's bytes in one buffer and the other formats' canvases in
    one tensor (a tensor per file would cost the worker a shared-memory file descriptor each).
    ``items``: per image in batch order, (row, is_jpeg), or the error of a file that failed."""
    items: list
    jpeg_bytes: torch.Tensor         # uint8 [sum of sizes]
    jpeg_sizes: list[int]
    canvases: Optional[torch.Tensor]  # uint8 [n, 3, S, S] of the images that are not JPEGs


def pack_items(items: list) -> EncodedBatch:
    """The collate function (runs in the workers)."""
    good = [it for it in items if isinstance(it, tuple)]
    jpegs = [it[0] for it in good if it[0].dim() == 1]
    others = [it[0] for it in good if it[0].dim() != 1]
    return EncodedBatch([(it[1], it[0].dim() == 1) if isinstance(it, tuple) else it for it in items],
                        torch.cat(jpegs) if jpegs else torch.empty(0, dtype=torch.uint8),
                        [len(b) for b in jpegs], torch.stack(others) if others else None)


class TorchvisionSource(WorkerSource):
    """Workers read bytes (``encoded_or_canvas``); the loading process decodes the batch's JPEGs on the
    loader's device (see the module doc)."""

    name = "torchvision"
    whole_images_refused = None   # crops cut from the image: it decodes the whole image anyway
    pin_memory = False   # nvjpeg reads bytes from ordinary host memory: a pin would be a copy more
    workers_transform = False   # the loading process decodes, so it transforms the batch too
    decode = staticmethod(encoded_or_canvas)
    collate = staticmethod(pack_items)

    def dataset(self):
        cfg = self.config
        if not cfg.crops_images:
            return super().dataset()
        return TransformingDataset(self.index, cfg.canvas, cfg.canvas_mode, encoded, None, cfg.rank)

    def canvases_of(self, batch: EncodedBatch):
        """(canvas on the device, rows, failed in batch order, as the reference's workers report them),
        and the whole images when the crops are cut from them."""
        cfg = self.config
        if cfg.crops_images:
            return self._images_of(batch)
        good = [k for k, it in enumerate(batch.items) if isinstance(it, tuple)]
        jpegs = [k for k in good if batch.items[k][1]]
        others = [k for k in good if not batch.items[k][1]]
        paths = [self.index.abspath(batch.items[k][0]) for k in jpegs]
        blobs = list(torch.split(batch.jpeg_bytes, batch.jpeg_sizes))      # views of the one buffer
        decoded = dict(zip(jpegs, jpeg_canvases(blobs, paths, cfg.canvas, cfg.canvas_mode, self.device)))
        if others:   # canvases the workers decoded: one transfer for all of them
            decoded.update(zip(others, to_device(batch.canvases, self.device)))
        canvases, rows, failed = [], [], []
        for k, item in enumerate(batch.items):
            if not isinstance(item, tuple):
                failed.append(item)            # the error of a file that failed in the worker
            elif decoded[k] is None:
                failed.append(DecodeError(self.index.abspath(item[0])))
            else:
                canvases.append(decoded[k])
                rows.append(item[0])
        return (torch.stack(canvases) if canvases else None), torch.tensor(rows, dtype=torch.int64), failed

    def _images_of(self, batch: EncodedBatch):
        """``canvases_of`` of a batch of files' bytes (``encoded``): each decoded whole, JPEGs on the device."""
        cfg = self.config
        good = [k for k, it in enumerate(batch.items) if isinstance(it, tuple)]
        blobs = dict(zip(good, torch.split(batch.jpeg_bytes, batch.jpeg_sizes)))
        paths = {k: self.index.abspath(batch.items[k][0]) for k in good}
        jpegs = [k for k in good if is_jpeg(blobs[k])]
        decoded: dict = dict(zip(jpegs, decode_on_device([blobs[k] for k in jpegs], [paths[k] for k in jpegs],
                                                         self.device)))
        for k in good:
            if k not in decoded:   # another format: the CPU decoder the reference's workers use
                try:
                    decoded[k] = to_device(decode_rgb_bytes(blobs[k], paths[k]), self.device)
                except DecodeError as e:
                    decoded[k] = e
        images, rows, failed = [], [], []
        for k, item in enumerate(batch.items):
            if not isinstance(item, tuple):
                failed.append(item)
            elif decoded[k] is None or isinstance(decoded[k], DecodeError):
                failed.append(decoded[k] or DecodeError(paths[k]))
            else:
                images.append(decoded[k])
                rows.append(item[0])
        if not images:
            return None, torch.tensor(rows, dtype=torch.int64), failed, None
        canvases = torch.stack(canvases_of(images, cfg.canvas, cfg.canvas_mode))
        return canvases, torch.tensor(rows, dtype=torch.int64), failed, pad_photos(images)

