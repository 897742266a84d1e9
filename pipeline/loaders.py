"""``make_loader(backend, ...)``: one entry point for every backend, and the table of backends."""
from __future__ import annotations

import importlib
from typing import Optional

import numpy as np

from backmix.cam_cache.maps import ForegroundMaps
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.index import ImageIndex

from .config import LoaderConfig
from .core import Loader, Source

# name -> its Source (pipeline/core.py), or (module, name) of it, imported on use: an optional
# backend's library (FFCV, Ray) says how to install it when missing. A backend is a Source and a line here.
SOURCES: dict[str, "tuple[str, str] | type"] = {
    "reference": (".reference", "WorkerSource"),
    "torchvision": (".torchvision_loader", "TorchvisionSource"),
    "dali": (".dali", "DaliSource"),
    "ffcv": (".ffcv", "FfcvSource"),
    "ray": (".ray_loader", "RaySource"),
}
BACKENDS = tuple(SOURCES)


def register_backend(name: str, source: type) -> None:
    """Adds a backend: ``make_loader(name, ...)`` then serves ``Loader(source, ...)``. ``source`` is a
    ``Source`` subclass (e.g. of ``reference.WorkerSource``, overriding ``decode``); a built-in
    backend's name stays the built-in's (a script could not tell which one it got)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_backend: name must be a non-empty str, not {name!r:.40}")
    if name in BACKENDS:
        raise BackMixError(f"register_backend: {name!r} is a built-in backend; register yours under another name")
    if not (isinstance(source, type) and issubclass(source, Source)):
        raise TypeError(f"register_backend: source must be a subclass of backmix.pipeline.core.Source, "
                        f"not {source!r:.60}")
    SOURCES[name] = source


def check_backend_config(backend: str, config: LoaderConfig) -> None:
    """What a backend refuses of a valid config, checked where its loader is made and by ``backmix train``
    before any work: DALI's pipeline has no step for auto-augment, which runs in the torch batch transform."""
    if backend == "dali" and config.train and config.auto_augment != "none":
        raise BackMixError("--auto-augment (auto_augment) runs in the torch batch transform: use --backend "
                           "reference, torchvision, ffcv or ray, not dali")


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
    0..K-1, -1 unknown; e.g. ``OpenSetSplit.label_map``) makes ``batch.labels`` closed-set.
    ``kwargs``: the backend's own options (``backend_options``)."""
    if backend not in SOURCES:
        raise BackMixError(f"unknown backend {backend!r} (choose from {', '.join(SOURCES)})")
    if backend == "dali":
        require_dali()
    source = SOURCES[backend]
    if isinstance(source, tuple):
        source = getattr(importlib.import_module(source[0], __package__), source[1])
    loader = Loader(source, index, config, maps, indices, label_map, **kwargs)
    loader.backend = backend   # its messages name it as registered (a subclass inherits its base's ``name``)
    return loader


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
        from .beton_location import DEFAULT_QUALITY, DEFAULT_STORAGE, check_storage
        options = {"beton_mode": beton_mode or DEFAULT_STORAGE,
                   "jpeg_quality": DEFAULT_QUALITY if jpeg_quality is None else jpeg_quality}
        check_storage(options["beton_mode"], options["jpeg_quality"])
        return options
    return {}


# What a Ray started here (no --ray-address) exposes, for every command's --ray-address help: its node
# address is loopback, but Ray's own servers listen on every interface (docs/security.md).
LOCAL_RAY_HELP = ("start Ray on this machine with --workers CPUs: its node address is 127.0.0.1, but Ray's "
                  "servers listen on every interface, behind Ray's token authentication (docs/security.md)")
