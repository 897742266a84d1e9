"""JPEG bytes to canvases on the loader's device: one batched decode, then the canvas resize there.

On a GPU, ``torchvision.io.decode_jpeg(list, device="cuda")`` decodes the whole
batch with nvjpeg and the canvas resize (``to_canvas``: the same torchvision
Resize + CenterCrop, or the stretch, as every loader) runs on the GPU, so the
pixels are born on the device and stay there. On the CPU the same call decodes
with libjpeg-turbo, the decoder ``decode_rgb`` uses, so the canvases are the
reference loader's bit for bit.

A file nvjpeg refuses (a CMYK or otherwise unusual JPEG) is decoded by
``decode_rgb_bytes`` on the CPU instead, as the reference loader would; one that
does not decode there either is reported, not guessed.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from backmix.osr_data.decode import DecodeError, decode_rgb_bytes, to_canvas

from .batch import to_device


def decode_on_device(blobs: list[Tensor], paths: list[str], device: torch.device) -> list[Optional[Tensor]]:
    """uint8 [3, H, W] on ``device`` for each JPEG's bytes (uint8 [N], host), None where it does not
    decode. One batched call; if it fails, image by image, so one bad file costs only itself."""
    if not blobs:
        return []
    try:
        return list(decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device))
    except (RuntimeError, ValueError):
        return [decode_one(blob, path, device) for blob, path in zip(blobs, paths)]


def decode_one(blob: Tensor, path: str, device: torch.device) -> Optional[Tensor]:
    if device.type != "cpu":
        try:
            return decode_jpeg(blob, mode=ImageReadMode.RGB, device=device)
        except (RuntimeError, ValueError):
            pass                       # nvjpeg refused it: the CPU decoder may not
    try:
        return to_device(decode_rgb_bytes(blob, path), device)
    except DecodeError:
        return None


def canvases_of(images: list[Optional[Tensor]], size: int, mode: str) -> list[Optional[Tensor]]:
    """``to_canvas`` of each decoded image, where it is; images of one shape are resized as one batch
    (one kernel launch for a folder of equal-sized photos instead of one per image)."""
    out: list[Optional[Tensor]] = [None] * len(images)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for k, image in enumerate(images):
        if image is not None:
            groups[tuple(image.shape)].append(k)
    for positions in groups.values():
        resized = to_canvas(torch.stack([images[k] for k in positions]), size, mode)
        for k, canvas in zip(positions, resized):
            out[k] = canvas
    return out


def jpeg_canvases(blobs: list[Tensor], paths: list[str], size: int, mode: str,
                  device: torch.device) -> list[Optional[Tensor]]:
    """The canvas (uint8 [3, size, size] on ``device``) of each JPEG's bytes; None: it does not decode."""
    return canvases_of(decode_on_device(blobs, paths, device), size, mode)
