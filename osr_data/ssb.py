"""The Semantic Shift Benchmark (Vaze et al. 2022): ``--protocol ssb-imagenet|ssb-cub|ssb-aircraft|ssb-scars``.

Each benchmark trains on every one of its known classes (``--split all``) and tests against unknown
classes of graded semantic distance from them, published as sets named Easy, Medium (the fine-grained
ones only) and Hard. Here each set is an ``--open-test`` folder named after it (``easy``, ``hard``, ...),
which must hold exactly that set's classes; the authors report Medium and Hard together as Hard, so a
folder named ``medium+hard`` stands for their union.

``ssb.json`` beside this module ships the lists (its ``source`` fields say where from): ImageNet classes
are wnids (ImageNet-1k known, ImageNet-21K-P unknown); the fine-grained data sets have no standard class
folder names, so their classes are the benchmark's 0-based class indices written with 3 digits
("000", "001", ...), and ``names`` gives each index's class name.
"""
from __future__ import annotations

import json
from pathlib import Path

from .limits import MAX_SPLITS_BYTES, read_bounded

SSB_FILE = Path(__file__).with_name("ssb.json")
SSB_PROTOCOLS = ("ssb-imagenet", "ssb-cub", "ssb-aircraft", "ssb-scars")
MERGED_HARD = "medium+hard"


def ssb_lists(name: str) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """(the known classes, {set name: its unknown classes}) of benchmark ``name``; parsed, never run."""
    shipped = json.loads(read_bounded(SSB_FILE, "--protocol", MAX_SPLITS_BYTES).decode("utf-8"))[name]
    sets = {difficulty: tuple(classes) for difficulty, classes in shipped["unknown"].items()}
    if "medium" in sets:
        sets[MERGED_HARD] = sets["medium"] + sets["hard"]
    return tuple(shipped["known"]), sets


def ssb_class_names(name: str) -> dict[str, str]:
    """Class folder name -> class name, for the fine-grained benchmarks (ImageNet's folders are wnids)."""
    shipped = json.loads(read_bounded(SSB_FILE, "--protocol", MAX_SPLITS_BYTES).decode("utf-8"))[name]
    return {f"{i:03d}": class_name for i, class_name in enumerate(shipped.get("names", ()))}
