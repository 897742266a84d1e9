"""Reading canvases in DataLoader workers: the Dataset the reference loader, the CAM pass and the
backends built on ``WorkerSource`` share, and the ``on_error`` policy applied to what they report.

A worker never raises for a file: it hands the error back (``read_canvas``'s "return"), and the
process that iterates applies the policy where the user sees it, in one line."""
from __future__ import annotations

from torch.utils.data import Dataset

import torch

from .decode import DecodeError, decode_canvas, read_canvas
from .errors import BackMixError


class CanvasDataset(Dataset):
    """dataset row -> (canvas, row), or the error of a file that failed (``read_canvas``'s "return"):
    what a worker runs per file. ``decode(path, size, mode)``: default ``decode_canvas``.

    Workers only read the index's column buffers (no per-row Python objects), so its pages stay
    shared with the main process instead of being copied into each worker."""

    def __init__(self, index, canvas: int, mode: str, decode=None) -> None:
        self.index, self.canvas, self.mode, self.decode = index, canvas, mode, decode or decode_canvas

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, row: int):
        out = read_canvas(self.index, row, self.canvas, self.mode, on_error="return", decode=self.decode)
        return out if isinstance(out, Exception) else (out, row)


def collate_canvases(items: list):
    """(canvas [n, 3, S, S] or None, rows int64 [n], failed) of ``CanvasDataset`` items (in the worker)."""
    good = [it for it in items if isinstance(it, tuple)]
    failed = [it for it in items if not isinstance(it, tuple)]
    canvas = torch.stack([g[0] for g in good]) if good else None
    return canvas, torch.tensor([g[1] for g in good], dtype=torch.int64), failed


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
