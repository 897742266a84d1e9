"""``make_loader(backend, ...)``: one entry point for the five backends."""
from __future__ import annotations

from typing import Optional

import numpy as np

from backmix.cam_cache.maps import ForegroundMaps
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.index import ImageIndex

from .config import LoaderConfig

BACKENDS = ("reference", "torchvision", "dali", "ffcv", "ray")


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
    if backend == "torchvision":
        from .torchvision_loader import TorchvisionLoader
        return TorchvisionLoader(index, config, maps, indices, label_map)
    if backend == "dali":
        require_dali()
        from .dali import DaliLoader
        return DaliLoader(index, config, maps, indices, label_map, **kwargs)
    if backend == "ffcv":
        from .ffcv import FfcvLoader   # says how to install FFCV when it is missing
        return FfcvLoader(index, config, maps, indices, label_map, **kwargs)
    if backend == "ray":
        from .ray_loader import RayLoader   # says how to install Ray when it is missing
        return RayLoader(index, config, maps, indices, label_map, **kwargs)
    raise BackMixError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")


def backend_options(backend: str, *, ray_address: Optional[str] = None, prefetch: Optional[int] = None,
                    beton_mode: Optional[str] = None, jpeg_quality: Optional[int] = None) -> dict:
    """``make_loader``'s keyword arguments from the command line's Ray and FFCV options (None: not
    given); refuses them for another backend, which would ignore them."""
    given = {"--ray-address": ray_address, "--prefetch": prefetch, "--beton-mode": beton_mode,
             "--jpeg-quality": jpeg_quality}
    own = {"ray": ("--ray-address", "--prefetch"), "ffcv": ("--beton-mode", "--jpeg-quality")}.get(backend, ())
    foreign = [name for name, value in given.items() if value is not None and name not in own]
    if foreign:
        takes = "ray" if foreign[0] in ("--ray-address", "--prefetch") else "ffcv"
        names = [name for name in foreign if name.startswith(("--ray", "--pre")) == (takes == "ray")]
        raise BackMixError(f"only --backend {takes} takes {' and '.join(names)}, not --backend {backend}")
    if backend == "ray":
        from .ray_loader import DEFAULT_PREFETCH, check_options
        check_options(ray_address, DEFAULT_PREFETCH if prefetch is None else prefetch)
        return {"address": ray_address, "prefetch": prefetch}
    if backend == "ffcv":
        from .beton_location import DEFAULT_MODE, DEFAULT_QUALITY, check_storage
        options = {"beton_mode": beton_mode or DEFAULT_MODE,
                   "jpeg_quality": DEFAULT_QUALITY if jpeg_quality is None else jpeg_quality}
        check_storage(options["beton_mode"], options["jpeg_quality"])
        return options
    return {}
