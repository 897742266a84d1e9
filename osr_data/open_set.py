"""An open-set data set: a prepared root's train/ and test/ folders, the split of its classes into
known and unknown, and the training rows less a validation share (``holdout``)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import BackMixError
from .holdout import split_validation
from .index import ImageIndex
from .protocols import SplitList
from .splits import ALL, OpenSetSplit, resolve_split


@dataclass
class OpenSetData:
    train: ImageIndex
    test: ImageIndex
    split: OpenSetSplit
    label_map: np.ndarray        # dataset label -> 0..K-1, -1 for unknown classes
    known_rows: np.ndarray       # train rows of known classes trained on (the validation rows left out)
    val_rows: np.ndarray = dataclasses.field(default_factory=lambda: np.empty(0, np.int64))  # held out

    @property
    def num_known(self) -> int:
        return len(self.split.known)


def data_folders(root: str | os.PathLike) -> tuple[Path, Path]:
    root = Path(root)
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root / "train", root / "test"
    raise BackMixError(f"--data {root} must hold train/ and test/ image folders "
                       f"(write one with `backmix data prepare --out {root}`)")


def load_data(root: str | os.PathLike, split: str | OpenSetSplit, val_fraction: float = 0.0,
              val_seed: int = 0, splits: Optional[SplitList] = None) -> OpenSetData:
    """The train/test folders of ``root`` and ``split``; ``val_fraction`` of each known class's training
    images (chosen by ``val_seed``) become the validation rows (``backmix.osr_data.holdout``). With
    ``splits`` (``--protocol``/``--splits``) ``split`` is a number into that list."""
    str_split = str(split).strip() if not isinstance(split, OpenSetSplit) else None
    train_dir, test_dir = data_folders(root)
    train, test = ImageIndex.load(train_dir), ImageIndex.load(test_dir)
    if train.classes != test.classes:
        raise BackMixError(f"{train_dir} and {test_dir} have different classes; both need the same folders")
    if isinstance(split, OpenSetSplit):
        missing = [c for c in split.known if c not in train.classes]
        if missing:
            raise BackMixError(f"known class {missing[0]!r} is not in {train_dir} "
                               f"(classes: {', '.join(train.classes)})")
        split = OpenSetSplit(split.known, tuple(c for c in train.classes if c not in split.known))
    elif splits is not None:
        split = splits.resolve(train.classes, split)
    else:
        split = resolve_split(train.classes, split)
    # every class known: asked for as "all", a protocol's one split, or a checkpoint's known classes that
    # are all of them
    every_known = str_split in (ALL, None) or (splits is not None and splits.every_known)
    if len(split.known) < 2 or not (split.unknown or every_known):
        raise BackMixError(f"an open-set split needs at least 2 known classes and 1 unknown one; got "
                           f"{len(split.known)} known ({', '.join(split.known)}) of {len(train.classes)} classes "
                           f"(every class known, with unknowns from --open-test folders: --split all)")
    lut = split.label_map(train.classes)
    known_rows, val_rows = split_validation(train.labels, np.flatnonzero(lut[train.labels] >= 0),
                                            val_fraction, val_seed)
    return OpenSetData(train, test, split, lut, known_rows, val_rows)
