"""``backmix data prepare``: write a bundled data set to disk in the ImageNet layout.

No download is possible, so the default data set is real labeled images that an
installed package carries: scikit-learn's handwritten digits (1,797 scans of 10
classes, 8 x 8 at 17 grey levels), upscaled to 32 x 32 RGB PNGs. The layout is
``out/train/<class>/<image>.png`` and ``out/test/<class>/<image>.png``, each with
its ``index.csv``, exactly what a user's own ImageNet-style folder looks like.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from backmix._fs import atomic_folder

from .errors import BackMixError
from .split_folder import write_split

SPLITS = ("train", "test")


def digits_arrays(size: int = 32, seed: int = 0):
    """(train_images, train_labels, test_images, test_labels, class_names) of the digits, uint8 HxWx3."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    imgs = (digits.images / 16.0 * 255.0).round().astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in imgs])
    big = np.repeat(big[..., None], 3, axis=-1)
    idx = np.arange(len(big))
    tr, te = train_test_split(idx, test_size=0.3, stratify=digits.target, random_state=seed)
    names = tuple(f"digit_{d}" for d in range(10))
    return big[np.sort(tr)], digits.target[np.sort(tr)], big[np.sort(te)], digits.target[np.sort(te)], names


def prepare_digits(out: Path, seed: int = 0, **_) -> None:
    xtr, ytr, xte, yte, names = digits_arrays(seed=seed)
    write_split(out / "train", xtr, ytr, names)
    write_split(out / "test", xte, yte, names)


def _composite(out: Path, **kwargs) -> None:
    from .composite import prepare_digits_on_photos
    prepare_digits_on_photos(out, **kwargs)


def _composite_p80(out: Path, **kwargs) -> None:
    """digits-on-photos with the stronger prior 0.8: a data set name of its own, so an experiment
    can hold both priors side by side."""
    _composite(out, **{**kwargs, "prior": 0.8})


def _photo_crops(out: Path, **kwargs) -> None:
    from .photo_crops import prepare_photo_crops
    prepare_photo_crops(out, **kwargs)


DATASETS: dict[str, Callable[..., None]] = {
    "digits": prepare_digits,
    "digits-on-photos": _composite,
    "digits-on-photos-p80": _composite_p80,
    "photo-crops": _photo_crops,     # unknowns only: the photographs with no digit (``--open-test``)
}


def is_prepared(out: Path) -> bool:
    return all((out / s / "index.csv").exists() for s in SPLITS)


def prepare(name: str, out: str | os.PathLike, force: bool = False, **kwargs) -> bool:
    """Write data set ``name`` to ``out``; False if it was there already.

    The data set is built in a temporary folder beside ``out`` and renamed into
    place, so an interrupted prepare leaves nothing half written. The
    destination is checked before any image is made.
    """
    if name not in DATASETS:
        raise BackMixError(f"unknown data set {name!r} (choose from {', '.join(DATASETS)})")
    seed = kwargs.get("seed", 0)
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise BackMixError(f"--seed must be a whole number in [0, 2**32), got {seed!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BackMixError(f"--out {out} is a file, not a folder")
    recipe = {"dataset": name, "seed": seed, **kwargs}
    if out.exists():
        if is_prepared(out) and not force:
            check_same_recipe(out, recipe)
            return False
        if any(out.iterdir()) and not force:
            raise BackMixError(f"{out} exists and is not a prepared data set; pass --force to replace it")
    with atomic_folder(out) as tmp:
        DATASETS[name](tmp, **kwargs)
        (tmp / RECIPE_NAME).write_text(json.dumps(recipe, sort_keys=True) + "\n")
    return True


# What a prepared folder was made from (data set, prior, seed): a second prepare into it with other
# values is refused rather than answered "already prepared" over a data set it did not ask for.
RECIPE_NAME = "prepared.json"


def check_same_recipe(out: Path, recipe: dict) -> None:
    try:
        old = json.loads((out / RECIPE_NAME).read_text())
    except (OSError, ValueError):
        return   # prepared before recipes were recorded (or by hand): nothing to compare
    if any(k in old and old[k] != v for k, v in recipe.items()):   # a value not recorded is not compared
        def says(r: dict) -> str:
            return ", ".join(f"{k} {r[k]}" for k in sorted(r))
        raise BackMixError(f"{out} holds another data set ({says(old)}), not {says(recipe)}; "
                           "pass --force to replace it or choose another --out")
