"""External unknown sets (``--open-test DIR``): image folders whose every image is unknown.

ImageNet-scale open-set work tests against other image sets besides the held-out
classes of the same folder (Vaze et al.'s Semantic Shift Benchmark, OpenOOD). Each
DIR is an image folder (any class names, its own index.csv or scanned on first
use); evaluation scores the known test images against it exactly as against the
held-out classes, and reports it under its folder's name.
"""
from __future__ import annotations

import os
from pathlib import Path

from backmix.osr_data.errors import BackMixError
from backmix.osr_data.index import ImageIndex

# A DIR named like a split is reported with its parent's name: data/photo-crops/test -> "photo-crops/test".
SPLIT_NAMES = ("train", "test", "val")


def open_test_name(folder: str | os.PathLike) -> str:
    path = Path(folder).resolve()
    return f"{path.parent.name}/{path.name}" if path.name in SPLIT_NAMES else path.name


def open_test_indexes(folders: list[str]) -> dict[str, ImageIndex]:
    """{name: index} of every ``--open-test`` folder, checked before any training."""
    sets: dict[str, ImageIndex] = {}
    for folder in folders:
        if not Path(folder).is_dir():
            raise BackMixError(f"--open-test {folder} is not a folder of images")
        name = open_test_name(folder)
        if name in sets:
            raise BackMixError(f"two --open-test folders are both named {name!r}; rename one of them")
        index = ImageIndex.load(folder)
        if len(index) == 0:
            raise BackMixError(f"--open-test {folder} holds no images")
        sets[name] = index
    return sets
