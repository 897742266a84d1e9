"""Generation 0 without a file: a cache whose CURRENT names generation 0 as uniform.

Generation 0 is 0.5 everywhere, so writing it costs a file of the data set's size (184 MB and
seconds at ImageNet's 1.28 M images) for no information. ``start_cache`` writes only CURRENT,
naming generation 0 with what a reader checks (grid, canvas mode, the index's fingerprint and
rows) and where the labels are (the index's folder, read only when the first rebuild publishes:
the label column of generation 1). Readers (``ForegroundCache``) then serve a zero-copy
broadcast of 0.5; the first rebuild blends its CAMs with those 0.5s and writes generation 1 as a
file, as it would from a written generation 0. ``init_cache`` (``backmix cache init``) still
writes the file, for a cache a user prepares by hand.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from backmix.osr_data.errors import BackMixError
from backmix.osr_data.index import ImageIndex

from .generation_file import FORMAT
from .store import (POINTER, ForegroundCache, check_cache_dir, check_grid, generations_on_disk, init_cache,
                    write_pointer)

UNIFORM_VALUE = 0.5


class UniformGeneration:
    """Generation 0 as a reader sees a generation file (``MappedMaps``'s attributes), with no file."""

    def __init__(self, cache_dir: Path, uniform: dict) -> None:
        self.path = Path(cache_dir) / POINTER
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


def start_cache(cache_dir: str | os.PathLike, index: ImageIndex, *, grid: int = 8, keep: int = 3,
                canvas_mode: str = "center") -> ForegroundCache:
    """The cache for ``index``: the existing one (checked as ``init_cache`` checks it), else a new one whose
    generation 0 is uniform and has no file (CURRENT only: instant at any size)."""
    from backmix.osr_data.decode import check_canvas_mode
    check_canvas_mode(canvas_mode)
    cache_dir = check_cache_dir(cache_dir)
    check_grid(grid)
    if cache_dir.is_dir() and ((cache_dir / POINTER).exists() or generations_on_disk(cache_dir)):
        return init_cache(cache_dir, index, grid=grid, keep=keep, canvas_mode=canvas_mode)
    if keep < 1:
        raise BackMixError(f"keep must be at least 1, got {keep}")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BackMixError(f"cannot create cache folder {cache_dir}: {e.strerror}") from None
    write_pointer(cache_dir, 0, keep, uniform={"grid": grid, "rows": len(index), "canvas_mode": canvas_mode,
                                               "dataset": index.fingerprint(), "index": str(Path(index.root).resolve())})
    return ForegroundCache(cache_dir, index=index, grid=grid, canvas_mode=canvas_mode)
