"""``make_loader(backend, ...)``: one entry point for the three backends."""
from __future__ import annotations

from typing import Optional

import numpy as np

from backmix.cam_cache.maps import ForegroundMaps
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.index import ImageIndex

from .config import LoaderConfig

BACKENDS = ("reference", "dali", "ffcv")


def require_dali() -> None:
    """One line naming the install command when the optional DALI backend is missing."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise BackMixError("the dali backend needs NVIDIA DALI, which is not installed: "
                           "pip install 'backmix[dali]'") from None


def make_loader(backend: str, index: ImageIndex, config: LoaderConfig,
                maps: Optional[ForegroundMaps] = None, indices: Optional[np.ndarray] = None,
                label_map: Optional[np.ndarray] = None, **kwargs):
    """The loader of ``backend`` over rows ``indices`` of ``index``. ``label_map`` (dataset label ->
    0..K-1, -1 unknown; e.g. ``OpenSetSplit.label_map``) makes ``batch.labels`` closed-set."""
    if backend == "reference":
        from .reference import ReferenceLoader
        return ReferenceLoader(index, config, maps, indices, label_map)
    if backend == "dali":
        require_dali()
        from .dali import DaliLoader
        return DaliLoader(index, config, maps, indices, label_map, **kwargs)
    if backend == "ffcv":
        from .ffcv import FfcvLoader   # says how to install FFCV when it is missing
        return FfcvLoader(index, config, maps, indices, label_map, **kwargs)
    raise BackMixError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
