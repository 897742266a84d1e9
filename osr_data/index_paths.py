"""The relative paths of an image index held as columns: one UTF-8 buffer and N+1 int64 offsets.

At ImageNet scale (1.28 M rows) a Python string per path would cost gigabytes and, in forked
DataLoader workers, copy-on-write pages (reference counts); these two arrays are built from
pyarrow's ``large_string`` buffers without a copy and are only read.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class IndexPaths(Sequence):
    """The relative paths of an index, read-only: one UTF-8 buffer and N+1 offsets; items are ``str``."""

    __slots__ = ("data", "offsets")

    def __init__(self, data: np.ndarray, offsets: np.ndarray) -> None:
        self.data, self.offsets = data, offsets      # uint8 [bytes], int64 [N + 1]

    @classmethod
    def from_strings(cls, paths: Sequence[str]) -> "IndexPaths":
        encoded = [p.encode() for p in paths]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets)

    @classmethod
    def from_arrow(cls, array) -> "IndexPaths":
        """Zero-copy view of a pyarrow large_string array's buffers."""
        _, offsets, data = array.buffers()
        offsets = np.frombuffer(offsets, dtype=np.int64)[array.offset:array.offset + len(array) + 1]
        data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
        return cls(data, offsets)

    def to_arrow(self):
        import pyarrow as pa
        return pa.LargeStringArray.from_buffers(len(self), pa.py_buffer(self.offsets), pa.py_buffer(self.data))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"path {i} out of range ({n} paths)")
        i = int(i) % n
        return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes().decode()

    def __eq__(self, other) -> bool:
        if isinstance(other, IndexPaths):
            return bool(np.array_equal(self.offsets - self.offsets[0], other.offsets - other.offsets[0])
                        and np.array_equal(self.data[self.offsets[0]:self.offsets[-1]],
                                           other.data[other.offsets[0]:other.offsets[-1]]))
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"IndexPaths({len(self)} paths)"
