"""External unknown sets (``--open-test DIR``): image folders whose every image is unknown.

ImageNet-scale open-set work tests against other image sets besides the held-out
classes of the same folder (Vaze et al.'s Semantic Shift Benchmark, OpenOOD). Each
DIR is an image folder (any class names, its own index.csv or scanned on first
use); evaluation scores the known test images against it exactly as against the
held-out classes, and reports it under its folder's name. Under a protocol with published
sets of unknowns (``--protocol ssb-imagenet``), a folder named after one of them ("easy",
"hard") must hold exactly its classes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from backmix.osr_data.errors import BackMixError
from backmix.osr_data.index import ImageIndex
from backmix.osr_data.protocols import SplitList

# A DIR named like a split is reported with its parent's name: data/photo-crops/test -> "photo-crops/test".
SPLIT_NAMES = ("train", "test", "val")


def open_test_name(folder: str | os.PathLike) -> str:
    path = Path(folder).resolve()
    return f"{path.parent.name}/{path.name}" if path.name in SPLIT_NAMES else path.name


def open_test_indexes(folders: list[str], data: Sequence[ImageIndex] = (),
                      published: Optional[SplitList] = None) -> dict[str, ImageIndex]:
    """{name: index} of every ``--open-test`` folder, checked before any training (and before anything
    is written to the run folder). ``data``: the run's own train and test folders, whose images are
    known classes (or the held-out ones): scored as unknowns they would give metrics that mean nothing.
    ``published``: the run's split list, whose sets of unknowns the folders named after them must hold."""
    sets: dict[str, ImageIndex] = {}
    for folder in folders:
        if str(folder) == "":
            raise BackMixError("--open-test: empty path (it would be the current folder)")
        if not Path(folder).is_dir():
            raise BackMixError(f"--open-test {folder} is not a folder of images")
        name = open_test_name(folder)
        if name in sets:
            raise BackMixError(f"two --open-test folders are both named {name!r}; rename one of them")
        _check_not_the_data(folder, data)
        index = ImageIndex.load(folder)
        if len(index) == 0:
            raise BackMixError(f"--open-test {folder} holds no images")
        if published is not None:
            published.check_open_set(name, folder, index.classes)
        for own in data:
            if index.fingerprint() == own.fingerprint():
                raise BackMixError(f"--open-test {folder} holds the very images of {own.root} (a copy): its "
                                   "images are not unknowns to this run; choose a folder of other images")
        sets[name] = index
    return sets


def _check_not_the_data(folder: str | os.PathLike, data: Sequence[ImageIndex]) -> None:
    """Refuse an open-test folder that is, lies inside or holds the run's train or test folder."""
    path = Path(folder).resolve()
    for own in data:
        root = own.root.resolve()
        if path == root or root in path.parents or path in root.parents:
            where = "is" if path == root else "lies inside" if root in path.parents else "holds"
            raise BackMixError(f"--open-test {folder} {where} the data's own folder {own.root}: its images are "
                               "the run's known (or held-out) classes, not unknowns; choose a folder of other images")
