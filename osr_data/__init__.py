"""The data stage: image folders, their index, open-set splits, decoding and bundled data."""
from typing import TYPE_CHECKING

from backmix._lazy import lazy_exports

_EXPORTS = {
    "BackMixError": ".errors", "DecodeError": ".decode", "check_canvas": ".decode", "decode_canvas": ".decode",
    "decode_rgb": ".decode", "to_canvas": ".decode", "ImageIndex": ".index",
    "DATASETS": ".prepare", "prepare": ".prepare", "OpenSetSplit": ".splits", "random_splits": ".splits",
    "resolve_split": ".splits", "OpenSetData": ".open_set", "load_data": ".open_set",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

if TYPE_CHECKING:
    from .decode import DecodeError, check_canvas, decode_canvas, decode_rgb, to_canvas
    from .errors import BackMixError
    from .index import ImageIndex
    from .open_set import OpenSetData, load_data
    from .prepare import DATASETS, prepare
    from .splits import OpenSetSplit, random_splits, resolve_split
