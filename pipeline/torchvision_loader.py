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
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

import torch

from backmix.osr_data.decode import check_pixels, decode_rgb_bytes, is_jpeg, read_bytes, to_canvas

from .batch import to_device
from .device_decode import jpeg_canvases
from .reference import CanvasDataset, ReferenceLoader


class EncodedDataset(CanvasDataset):
    """dataset index -> (pixels, label, index), where pixels are a JPEG's file bytes (uint8 [N], decoded
    later on the device) or any other format's canvas (uint8 [3, S, S], decoded here); failures as
    ``CanvasDataset``."""

    def pixels(self, path: str) -> torch.Tensor:
        data = read_bytes(path)
        if is_jpeg(data):
            check_pixels(path, data.numpy().tobytes())   # the header only: no gigapixel decode on the device
            return data
        return to_canvas(decode_rgb_bytes(data, path), self.canvas, self.mode)


class EncodedBatch(NamedTuple):
    """A batch as workers hand it on: every JPEG's bytes in one buffer and the other formats' canvases in
    one tensor (a tensor per file would cost the worker a shared-memory file descriptor each).
    ``items``: per image in batch order, (label, index, is_jpeg), or what ``CanvasDataset`` reports
    for a failure (a path, or the error of a changed file)."""
    items: list
    jpeg_bytes: torch.Tensor         # uint8 [sum of sizes]
    jpeg_sizes: list[int]
    canvases: Optional[torch.Tensor]  # uint8 [n, 3, S, S] of the images that are not JPEGs


def pack_items(items: list) -> EncodedBatch:
    """The collate function (runs in the workers)."""
    good = [it for it in items if isinstance(it, tuple)]
    jpegs = [it[0] for it in good if it[0].dim() == 1]
    others = [it[0] for it in good if it[0].dim() != 1]
    return EncodedBatch([(it[1], it[2], it[0].dim() == 1) if isinstance(it, tuple) else it for it in items],
                        torch.cat(jpegs) if jpegs else torch.empty(0, dtype=torch.uint8),
                        [len(b) for b in jpegs], torch.stack(others) if others else None)


class TorchvisionLoader(ReferenceLoader):
    """Yields ``BackMixBatch`` for the images ``indices`` (default: all) of ``index``, decoded on
    ``config.device`` (see the module doc); arguments as ``ReferenceLoader``."""

    backend = "torchvision"

    def _setup_decoding(self) -> None:
        config = self.config
        # Bytes are not pinned: nvjpeg reads them from ordinary host memory, a pin would be a copy more.
        self._loader = self._data_loader(EncodedDataset(self.index, config.canvas, config.canvas_mode), pack_items,
                                         pin_memory=False)

    def _canvas_batches(self) -> Iterator:
        """``collate_canvases``'s (canvas, labels, indices, failed) of each batch, the canvas on the device
        and ``failed`` in batch order, as the reference loader's workers report it."""
        for batch in self._loader:
            yield self.assemble(batch)

    def assemble(self, batch: EncodedBatch):
        good = [k for k, it in enumerate(batch.items) if isinstance(it, tuple)]
        jpegs = [k for k in good if batch.items[k][2]]
        others = [k for k in good if not batch.items[k][2]]
        paths = [self.index.abspath(batch.items[k][1]) for k in jpegs]
        blobs = list(torch.split(batch.jpeg_bytes, batch.jpeg_sizes))      # views of the one buffer
        decoded = dict(zip(jpegs, jpeg_canvases(blobs, paths, self.config.canvas, self.config.canvas_mode,
                                                self.device)))
        if others:   # canvases the workers decoded: one transfer for all of them
            decoded.update(zip(others, to_device(batch.canvases, self.device)))
        canvases, labels, indices, failed = [], [], [], []
        for k, item in enumerate(batch.items):
            if not isinstance(item, tuple):
                failed.append(item)            # a path that did not decode, or the error of a changed file
            elif decoded[k] is None:
                failed.append(self.index.abspath(item[1]))
            else:
                canvases.append(decoded[k])
                labels.append(item[0])
                indices.append(item[1])
        if not canvases:
            return None, None, None, failed
        return (torch.stack(canvases), torch.tensor(labels, dtype=torch.int64),
                torch.tensor(indices, dtype=torch.int64), failed)
