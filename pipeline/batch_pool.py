"""Arrays a batch is written into once and then handed out as the batch's own, with no copy.

A loader that reuses a few fixed buffers (FFCV's slots) must copy every batch out of them, since the
caller may hold a batch past the slot's reuse: 38 MB a batch of 64 float32 224 x 224 crops, on the
cores the decoding needs. A pool instead hands out whole arrays and reuses one only once nothing
outside the pool holds it any more (its reference count back to the pool's own; torch's
``from_numpy`` tensors and numpy views hold it). A caller that keeps every batch gets new arrays, as
many as it keeps; the pool keeps at most ``size`` sets for reuse.
"""
from __future__ import annotations

import sys
import threading

import numpy as np


class BatchPool:
    """Sets of arrays of ``shapes`` (each [batch, *shape] of ``dtype``); ``take(n)`` gives a free set's
    first ``n`` rows. Thread-safe: the loader's thread takes, the training loop releases by dropping."""

    def __init__(self, batch: int, shapes: list[tuple[int, ...]], dtype, size: int) -> None:
        self.batch, self.shapes, self.dtype, self.size = batch, shapes, np.dtype(dtype), size
        self.sets: list[list[np.ndarray]] = []
        self._lock = threading.Lock()
        self._free = 0   # ``_refs`` of a set nothing outside the pool holds

    def take(self, n: int) -> list[np.ndarray]:
        with self._lock:
            for arrays in self.sets:
                if self._refs(arrays) <= self._free:
                    return [a[:n] for a in arrays]
            arrays = [np.empty((self.batch, *shape), self.dtype) for shape in self.shapes]
            if len(self.sets) < self.size:
                self.sets.append(arrays)
                # What ``_refs`` counts of a set held by the pool alone, measured by the same call.
                self._free = self._refs(arrays)
            return [a[:n] for a in arrays]

    @staticmethod
    def _refs(arrays: list[np.ndarray]) -> int:
        return max(sys.getrefcount(a) for a in arrays)
