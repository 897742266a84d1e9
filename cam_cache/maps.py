"""The one interface through which loaders read foreground maps.

A loader only needs ``gather`` (the maps of a batch of dataset indices),
``grid``, and ``refresh`` (pick up a newer generation, called between epochs).
``UniformMaps`` is generation 0 held in memory: 0.5 everywhere, what a loader
uses before any cache exists. ``ForegroundCache`` (the Arrow cache) is the other.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class ForegroundMaps(Protocol):
    grid: int
    generation: int

    def __len__(self) -> int: ...

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """float32 [len(indices), grid, grid] for int64 dataset indices."""

    def refresh(self) -> bool:
        """Switch to the current generation if it changed; True when it did."""


class UniformMaps:
    """Every image's map is ``value`` everywhere (generation 0 of the paper)."""

    def __init__(self, num_images: int, grid: int = 8, value: float = 0.5) -> None:
        self.grid, self.generation, self.value = grid, 0, value
        self._n = num_images

    def __len__(self) -> int:
        return self._n

    def gather(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices)
        if indices.size and (indices.min() < 0 or indices.max() >= self._n):
            raise IndexError(f"dataset index out of range 0..{self._n - 1}")
        return np.full((len(indices), self.grid, self.grid), self.value, dtype=np.float32)

    def refresh(self) -> bool:
        return False


class ArrayMaps(UniformMaps):
    """Maps held in a numpy array [N, g, g]; handy for tests and small data sets."""

    def __init__(self, maps: np.ndarray) -> None:
        super().__init__(len(maps), maps.shape[-1])
        self.maps = np.ascontiguousarray(maps, dtype=np.float32)

    def gather(self, indices: np.ndarray) -> np.ndarray:
        return self.maps[np.asarray(indices)]
