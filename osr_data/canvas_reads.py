"""Reading canvases in DataLoader workers: the Dataset the reference loader, the CAM pass and the
backends built on ``WorkerSource`` share, and the ``on_error`` policy applied to what they report.

A worker never raises for a file: it hands the error back (``read_canvas``'s "return"), and the
process that iterates applies the policy where the user sees it, in one line."""
from __future__ import annotations

from typing import NamedTuple, Optional

from torch.utils.data import Dataset

import torch

from .decode import DecodeError, decode_canvas, decode_rgb, decode_rgb_bytes, read_canvas, to_canvas
from .errors import BackMixError


class Photos(NamedTuple):
    """A batch of whole images of any sizes: each at the top left of its slot in ``pixels``, the rest
    zeros (no crop box reaches it); ``sizes`` stays on the host, where the crop boxes are drawn."""
    pixels: torch.Tensor   # uint8 [n, 3, H, W]: H, W the batch's largest height and width
    sizes: torch.Tensor    # int64 [n, 2]: each image's height and width


def pad_photos(images: list) -> Photos:
    """``Photos`` of uint8 [3, h, w] images (on any one device)."""
    sizes = torch.tensor([tuple(im.shape[-2:]) for im in images], dtype=torch.int64).reshape(-1, 2)
    height, width = (int(v) for v in sizes.max(0).values)
    pixels = torch.zeros((len(images), 3, height, width), dtype=torch.uint8, device=images[0].device)
    for slot, image in zip(pixels, images):
        slot[:, :image.shape[-2], :image.shape[-1]] = image
    return Photos(pixels, sizes)


def decode_canvas_and_image(path: str, size: int, mode: str, data=None) -> tuple:
    """(canvas, the whole image) of one file: ``CanvasDataset``'s read when crops come from the image.
    ``data``: the file's bytes already read (uint8 [N], e.g. from a beton); else read from ``path``."""
    image = decode_rgb(path) if data is None else decode_rgb_bytes(data, path)
    return to_canvas(image, size, mode), image


class CanvasDataset(Dataset):
    """dataset row -> (canvas, row), or the error of a file that failed (``read_canvas``'s "return"):
    what a worker runs per file. ``decode(path, size, mode)``: default ``decode_canvas``.
    ``whole``: also the whole image, (canvas, row, image), for crops cut from the image; ``decode``
    then returns (canvas, image) (default ``decode_canvas_and_image``).

    Workers only read the index's column buffers (no per-row Python objects), so its pages stay
    shared with the main process instead of being copied into each worker."""

    def __init__(self, index, canvas: int, mode: str, decode=None, whole: bool = False) -> None:
        self.index, self.canvas, self.mode, self.whole = index, canvas, mode, whole
        self.decode = decode or (decode_canvas_and_image if whole else decode_canvas)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, row: int):
        out = read_canvas(self.index, row, self.canvas, self.mode, on_error="return", decode=self.decode)
        if isinstance(out, Exception):
            return out
        return (out[0], row, out[1]) if self.whole else (out, row)


def collate_canvases(items: list):
    """(canvas [n, 3, S, S] or None, rows int64 [n], failed) of ``CanvasDataset`` items (in the worker)."""
    good = [it for it in items if isinstance(it, tuple)]
    failed = [it for it in items if not isinstance(it, tuple)]
    canvas = torch.stack([g[0] for g in good]) if good else None
    return canvas, torch.tensor([g[1] for g in good], dtype=torch.int64), failed


def collate_photos(items: list) -> Optional[Photos]:
    """The whole images of ``CanvasDataset(whole=True)`` items that decoded, padded (``pad_photos``);
    None when there are none, or the items carry no whole image."""
    images = [it[2] for it in items if isinstance(it, tuple) and len(it) == 3]
    return pad_photos(images) if images else None


def undecodable(failed: list, on_error: str) -> list[DecodeError]:
    """The ``on_error`` policy for the files of one batch that failed (each a ``DecodeError``, the
    ``BackMixError`` of a file missing or changed since indexing, or a path that did not decode):
    the first file missing or changed raises whatever the policy (the data set no longer matches
    its index, caches or betons); under "raise" so does the first that does not decode; under
    "skip" those are returned, to be counted and left out."""
    for error in failed:
        if isinstance(error, BackMixError) and not isinstance(error, DecodeError):
            raise error
    errors = [e if isinstance(e, DecodeError) else DecodeError(str(e)) for e in failed]
    if errors and on_error == "raise":
        raise errors[0]
    return errors
