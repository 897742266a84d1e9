"""Generation 0 without a file, as readers see it: a cache whose CURRENT names generation 0 as uniform.

Generation 0 is 0.5 everywhere, so writing it costs a file of the data set's size (184 MB and
seconds at ImageNet's 1.28 M images) for no information. ``start_cache`` (store.py) writes only CURRENT,
naming generation 0 with what a reader checks (grid, canvas mode, the index's fingerprint and
rows) and where the labels are (the index's folder, read only when the first rebuild publishes:
the label column of generation 1). Readers (``ForegroundCache``) then serve a zero-copy
broadcast of 0.5; the first rebuild blends its CAMs with those 0.5s and writes generation 1 as a
file, as it would from a written generation 0. ``init_cache`` (``backmix cache init``) still
writes the file, for a cache a user prepares by hand.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from backmix.osr_data.errors import BackMixError
from backmix.osr_data.index import ImageIndex

from .generation_file import FORMAT

UNIFORM_VALUE = 0.5


class UniformGeneration:
    """Generation 0 as a reader sees a generation file (``MappedMaps``'s attributes), with no file:
    ``uniform`` is what the cache's pointer file ``pointer`` says of it."""

    def __init__(self, pointer: Path, uniform: dict) -> None:
        self.path = Path(pointer)
        try:
            self.grid, n = int(uniform["grid"]), int(uniform["rows"])
            self.canvas_mode, self._index_root = str(uniform["canvas_mode"]), str(uniform["index"])
            dataset = str(uniform["dataset"])
        except (KeyError, TypeError, ValueError):
            raise BackMixError(f"{self.path} names a uniform generation 0 without its grid, rows, canvas mode, "
                               "index and data set") from None
        self.meta = {"format": FORMAT, "generation": "0", "momentum": "0.0", "checkpoint": "", "dataset": dataset,
                     "grid": str(self.grid), "canvas_mode": self.canvas_mode, "uniform": "true"}
        # One float16 broadcast to [N, g, g]: no memory per row, read-only like a memory map.
        self.maps = np.broadcast_to(np.float16(UNIFORM_VALUE), (n, self.grid, self.grid))
        self.rows = np.arange(n, dtype=np.int64)
        self._labels = None

    @property
    def labels(self) -> np.ndarray:
        """The index's labels, read from its folder (only the first publish needs them)."""
        if self._labels is None:
            index = ImageIndex.load(self._index_root)
            if index.fingerprint() != self.meta["dataset"] or len(index) != len(self):
                raise BackMixError(f"the index at {self._index_root} changed since {self.path} named it; "
                                   "delete the cache folder and start again")
            self._labels = np.asarray(index.labels, dtype=np.int64)
        return self._labels

    def __len__(self) -> int:
        return len(self.maps)
