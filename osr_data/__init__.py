"""The data stage: image folders, their index, open-set splits, decoding and bundled data."""
from .decode import DecodeError, check_canvas, decode_canvas, decode_rgb, to_canvas
from .errors import BackMixError
from .index import ImageIndex, atomic_write_bytes
from .prepare import DATASETS, prepare
from .splits import OpenSetSplit, random_splits, resolve_split

__all__ = [
    "BackMixError", "DecodeError", "ImageIndex", "OpenSetSplit", "DATASETS",
    "atomic_write_bytes", "check_canvas", "decode_canvas", "decode_rgb", "prepare",
    "random_splits", "resolve_split", "to_canvas",
]
